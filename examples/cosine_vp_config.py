"""Two-moons toy trained and sampled with the cosine VP SDE defined in `examples/cosine_vp.py`:

    python main.py --config=examples/cosine_vp_config.py --workdir=/tmp/cosine
"""
import examples.cosine_vp  # noqa: F401  (registers "cosine_vpsde")
from configs import toy


def get_config():
    config = toy.get_config("two_moons")
    config.sde.name = "cosine_vpsde"
    return config
