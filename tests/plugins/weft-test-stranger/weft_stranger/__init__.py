"""A stranger's manager: tasks on a concurrent.futures.ThreadPoolExecutor."""

from ._manager import FuturesManager, FuturesRuntime

__all__ = ["FuturesManager", "FuturesRuntime"]
