"""Runnable examples for weft (``weft serve examples.echo:handle``)."""
