"""A plugin that cannot be imported, as one whose runtime is missing."""

raise ImportError("weft_test_broken needs the 'no_such_runtime' package")
