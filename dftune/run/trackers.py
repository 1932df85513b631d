"""Experiment trackers: starting the runs that get our run configuration, and closing them with the summary.

TRACKERS at the end of this file has one entry per tracker this project starts itself (a start and a close
function); a new tracker is one entry there plus its test. Any other `--report_to` name that transformers
knows still works through transformers' own callback.

Trackers (`--report_to swanlab wandb tensorboard`, any subset) get the same run configuration. Only rank 0
creates a tracker run. transformers' own SwanLab callback calls `swanlab.get_run()`, which raises
"No active Run" in swanlab >= 0.8 before any run exists; it is replaced by swanlab's own integration
(`swanlab.integration.transformers.SwanLabCallback`) on a run we start ourselves.

Local tracker files go with the run: wandb under WANDB_DIR or LOGGING_DIR, swanlab under
SWANLAB_LOG_DIR or LOGGING_DIR/swanlog, TensorBoard events in LOGGING_DIR. WANDB_MODE=offline and
SWANLAB_MODE=offline (or local) work without a network.
"""

from __future__ import annotations

import configparser
import json
import netrc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from transformers import TrainerCallback

DEFAULT_PROJECT = "dft-trainer"


def normalize_report_to(report_to: Any) -> list[str]:
    """`--report_to swanlab wandb`, `--report_to swanlab,wandb` or one name -> a list of tracker names.

    Raises:
        ValueError: an unknown tracker name (the message names --report_to and the choices).
    """
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    items = [report_to] if report_to is None or isinstance(report_to, str) else list(report_to)
    names = [name.strip() for item in items if item for name in str(item).split(",") if name.strip()]
    known = ["none", "all", *INTEGRATION_TO_CALLBACK]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--report_to {' '.join(unknown)}: unknown tracker; choose from {', '.join(known)}.")
    if len(names) > 1 and ("none" in names or "all" in names):
        raise ValueError("--report_to none / all cannot be combined with other trackers.")
    return names or ["none"]


def tracker_project(env_name: str, training_args) -> str:
    project = getattr(training_args, "project", None)
    return os.environ.get(env_name) or (project if project and project != "huggingface" else DEFAULT_PROJECT)


def start_swanlab(trainer, run_config: dict) -> bool:
    """Swaps transformers' SwanLab callback for swanlab's own, on a run started here (rank 0 only)."""
    from transformers.integrations import SwanLabCallback as HFSwanLabCallback

    if trainer.pop_callback(HFSwanLabCallback) is None:
        return False
    import swanlab
    from swanlab.integration.transformers import SwanLabCallback

    trainer.add_callback(SwanLabCallback())
    if not trainer.is_world_process_zero():
        return False
    args = trainer.args
    log_dir = os.environ.get("SWANLAB_LOG_DIR") or os.path.join(args.logging_dir or args.output_dir, "swanlog")
    os.makedirs(log_dir, exist_ok=True)
    # The mode comes from SWANLAB_MODE (online / local / offline / disabled), as swanlab documents.
    swanlab.init(project=tracker_project("SWANLAB_PROJECT", args), name=run_config["run_name"], log_dir=log_dir, config=run_config)
    return True


def start_wandb(trainer, run_config: dict) -> bool:
    """Starts the wandb run here (rank 0) so it gets our config and dir; transformers' callback reuses it."""
    if not trainer.is_world_process_zero():
        return False
    import wandb

    args = trainer.args
    wandb_dir = os.environ.get("WANDB_DIR") or args.logging_dir or args.output_dir
    os.makedirs(wandb_dir, exist_ok=True)
    wandb.init(project=tracker_project("WANDB_PROJECT", args), name=run_config["run_name"], dir=wandb_dir, config=run_config)
    return True


def setup_tensorboard(trainer, run_config: dict) -> bool:
    """Events go to --logging_dir, and the run configuration goes along as text.

    transformers reads the TensorBoard directory from an environment variable that the *first* arguments
    parsed in this process set; a second run in the same process must not write into the first's."""
    from transformers.integrations import TensorBoardCallback

    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, TensorBoardCallback):
            if trainer.args.logging_dir:
                callback.logging_dir = trainer.args.logging_dir
            trainer.add_callback(RunConfigToTensorBoard(callback, run_config))
    return False  # transformers' callback owns the writer and closes it


class RunConfigToTensorBoard(TrainerCallback):
    """Adds run_config.json as text to the TensorBoard run. Registered after transformers'
    TensorBoardCallback, whose writer exists from its on_train_begin on."""

    def __init__(self, tensorboard_callback, run_config: dict):
        self.tensorboard_callback = tensorboard_callback
        self.run_config = run_config

    def on_train_begin(self, args, state, control, **kwargs):
        writer = self.tensorboard_callback.tb_writer
        if state.is_world_process_zero and writer is not None:
            writer.add_text("run_config", "```\n" + json.dumps(self.run_config, indent=2, default=str) + "\n```")


def close_wandb(numbers: dict, plain_summary: dict) -> None:
    import wandb

    if wandb.run is not None:
        wandb.run.summary.update({f"run_summary/{k}": v for k, v in numbers.items()})
        wandb.finish()


def close_swanlab(numbers: dict, plain_summary: dict) -> None:
    import swanlab

    if swanlab.has_run():
        swanlab.config.update({"run_summary": plain_summary})
        swanlab.finish()


# ---- logins, checked before the model loads ------------------------------------------------------------------
# The W&B cloud's API hosts: recent wandb releases talk to CoreWeave Forge's (the one `wandb login` writes to
# ~/.netrc) and still read an older api.wandb.ai entry, which older releases write.
WANDB_CLOUD_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")
WANDB_MODES_WITHOUT_LOGIN = ("offline", "dryrun", "disabled")


def _wandb_settings_files() -> list[str]:
    """wandb's settings files, where `wandb offline` / `wandb login --host` write: global, then this directory's."""
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".config", "wandb")
    return [os.path.join(config_dir, "settings"), os.path.join(os.environ.get("WANDB_DIR") or os.getcwd(), "wandb", "settings")]


def _wandb_setting(name: str) -> str | None:
    """A value of wandb's settings files (the directory's wins, as in wandb), else None."""
    value = None
    for path in _wandb_settings_files():
        parser = configparser.ConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        value = parser.get("default", name, fallback=value)
    return value


def _netrc_has_password(hosts: set[str]) -> bool:
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entries = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return False
    return any((entries.authenticators(host) or (None, None, None))[2] for host in hosts)


def wandb_login_problem() -> str | None:
    """Why wandb would stop the run at wandb.init() (no key in a non-interactive job), or None.

    wandb finds its key in WANDB_API_KEY (or WANDB_IDENTITY_TOKEN_FILE) or in ~/.netrc ($NETRC) under its API host
    (WANDB_BASE_URL); WANDB_MODE or `wandb offline` (its settings file) offline/disabled needs none."""
    mode = (os.environ.get("WANDB_MODE") or _wandb_setting("mode") or "online").strip().lower()
    if mode in WANDB_MODES_WITHOUT_LOGIN or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    base_url = os.environ.get("WANDB_BASE_URL") or _wandb_setting("base_url")
    hosts = set(WANDB_CLOUD_HOSTS) | ({urlsplit(base_url).netloc} if base_url else set())
    if _netrc_has_password(hosts):
        return None
    return (
        "--report_to wandb: no W&B login found (no WANDB_API_KEY, no ~/.netrc entry for api.wandb.ai); run `wandb login` "
        "or set WANDB_API_KEY, or log offline with WANDB_MODE=offline (WANDB_MODE=disabled: no logging)."
    )


def swanlab_login_problem() -> str | None:
    """Why swanlab would stop the run at swanlab.init() (no key), or None: swanlab's own settings say, as it
    reads them (SWANLAB_API_KEY, `swanlab login`'s saved key, SWANLAB_MODE, swanlab.yaml, ...)."""
    try:
        import swanlab

        settings = swanlab.Settings()
        mode, api_key = settings.mode, settings.api_key
    except Exception:  # an older or newer swanlab without this API: the variables it has always read
        mode, api_key = os.environ.get("SWANLAB_MODE", "online"), os.environ.get("SWANLAB_API_KEY")
    if (mode or "online").strip().lower() != "online" or api_key:
        return None
    return (
        "--report_to swanlab: no SwanLab login found (no SWANLAB_API_KEY, no saved `swanlab login`); run `swanlab login` "
        "or set SWANLAB_API_KEY, or log locally with SWANLAB_MODE=offline (or local; SWANLAB_MODE=disabled: no logging)."
    )


def check_tracker_logins(report_to: list[str]) -> None:
    """Checks that every tracker --report_to names can start without asking for a key.

    Raises:
        ValueError: the first tracker without a login, naming --report_to, how to log in and how to go offline.
    """
    for name in report_to or []:
        tracker = TRACKERS.get(name)
        problem = tracker.login_problem() if tracker is not None and tracker.login_problem is not None else None
        if problem:
            raise ValueError(problem)


# ---- the table ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tracker:
    """A tracker this project sets up itself when `--report_to` names it."""

    name: str
    # Called on every rank once the trainer exists; True when it started a run here that `close` must finish.
    start: Callable[[Any, dict], bool]
    # Called on rank 0 after training: (the summary's numbers, the whole summary as plain JSON values).
    close: Callable[[dict, dict], None] | None = None
    # Called before the model loads (rank 0): why the tracker could not start here (no login), or None.
    login_problem: Callable[[], str | None] | None = None


TRACKERS: dict[str, Tracker] = {tracker.name: tracker for tracker in (
    Tracker("swanlab", start_swanlab, close_swanlab, swanlab_login_problem),
    Tracker("wandb", start_wandb, close_wandb, wandb_login_problem),
    Tracker("tensorboard", setup_tensorboard),
)}


def start_trackers(trainer, run_config: dict) -> list[str]:
    """Starts the trackers of TRACKERS that --report_to names; returns those whose runs must be closed."""
    report_to = set(trainer.args.report_to or [])
    return [name for name, tracker in TRACKERS.items() if name in report_to and tracker.start(trainer, run_config)]


def close_trackers(trackers: list[str], summary: dict, plain_summary: dict) -> None:
    """Adds the run summary to the tracker runs started here and finishes them (rank 0)."""
    numbers = {
        key: value for key, value in summary.items() if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    numbers["peak_memory_gib"] = summary["peak_memory"]["peak_gib"]
    for name in trackers:
        if TRACKERS[name].close is not None:
            TRACKERS[name].close(numbers, plain_summary)
