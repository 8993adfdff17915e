"""Helpers shared by the tests: the config of every project."""


def add_all_configs(cfg):
    """Every config key of the shared core and both projects (what ``tools/train_net.py`` adds)."""
    from hiseg_cast import add_cast_config
    from hiseg_oap import add_oap_config

    return add_oap_config(add_cast_config(cfg))
