"""The config a run saved in its workdir: ``--config=configs/workdir.py:/path/to/workdir``.

``main.py`` uses it when ``--config`` is omitted, so ``python main.py --workdir=W --mode=sample
--config.sampling.method=ode`` reruns W's model with W's own settings plus the command-line overrides.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import utils  # noqa: E402


def get_config(workdir: str):
    config = utils.saved_config(workdir)
    if config is None:
        raise FileNotFoundError(f"{pathlib.Path(workdir) / 'config.json'} does not exist: this workdir has no saved "
                                f"config (pass --config=configs/<experiment>.py)")
    return config
