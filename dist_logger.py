"""Rank-aware logging: rank 0 speaks (INFO), other ranks only warn, every line with its rank.

An entry point for readers; the code lives in dftune/run/logs.py (see its docstring for the format).
"""

from dftune.run.logs import (
    LogMetricsCallback,
    format_duration,
    format_metrics,
    format_progress,
    get_rank,
    get_world_size,
    is_main_process,
    library_log_level,
    setup_logging,
    use_logging_for_metrics,
)

__all__ = [
    "LogMetricsCallback", "format_duration", "format_metrics", "format_progress", "get_rank", "get_world_size",
    "is_main_process", "library_log_level", "setup_logging", "use_logging_for_metrics",
]
