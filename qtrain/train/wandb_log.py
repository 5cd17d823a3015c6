"""Weights & Biases with Megatron's flags (`--wandb-project`, `--wandb-exp-name`, `--wandb-save-dir`,
`--wandb-entity`): rank 0 opens one run and logs each metrics record it writes to metrics.jsonl,
at step = the record's iteration. `WANDB_MODE=offline` (wandb's own variable) keeps the run on
disk for `wandb sync`. wandb is an optional extra (`pip install 'qtrain[wandb]'`).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

from qtrain.errors import ConfigError

INSTALL = "pip install wandb  (or: pip install 'qtrain[wandb]')"


def check_available(flag: str = "--wandb-project") -> None:
    """ConfigError naming `flag` and the install command when wandb is not installed."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"{flag} needs the wandb package, which is not installed: {INSTALL}")


def save_dir(cfg) -> Optional[str]:
    """--wandb-save-dir, else `<save>/wandb` as Megatron does, else wandb's default (./wandb)."""
    lg = cfg.logging
    if lg.wandb_save_dir:
        return lg.wandb_save_dir
    return os.path.join(cfg.checkpoint.save, "wandb") if cfg.checkpoint.save else None


def open_run(cfg) -> Any:
    """wandb.init with the run's options as its config (every qtrain option, by group)."""
    check_available()
    import wandb

    directory = save_dir(cfg)
    if directory:
        os.makedirs(directory, exist_ok=True)
    lg = cfg.logging
    return wandb.init(project=lg.wandb_project, name=lg.wandb_exp_name or None, entity=lg.wandb_entity or None,
                      dir=directory, config=cfg.to_dict())


def log(run: Any, record: dict[str, Any]) -> None:
    """One metrics record (as written to metrics.jsonl) at step = its iteration."""
    values = {k: v for k, v in record.items() if k != "iteration" and v is not None}
    run.log(values, step=int(record["iteration"]))
