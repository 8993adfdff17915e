"""One call that adds every config key of the shared code and both projects."""
__all__ = ["add_all_configs"]


def add_all_configs(cfg):
    import cast  # registers the CAST backbone and mapper

    from .config import add_hiseg_config

    add_hiseg_config(cfg)
    cast.add_cast_config(cfg)
    return cfg
