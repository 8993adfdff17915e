"""One call that adds every config key of the shared code and both projects."""
__all__ = ["add_all_configs"]


def add_all_configs(cfg):
    import cast  # registers the CAST backbones, meta-architectures and mappers
    import oap  # registers the ViT-Adapter backbone
    from cast.classification_config import add_cast_classification_config
    from cast.segmenter import add_cast_segmenter_config

    from .config import add_hiseg_config
    from .modeling import add_vit_config  # registers build_vit_backbone
    from .modeling.vit_kmeans import add_vit_kmeans_config  # registers ViTKMeansSegmenter

    add_hiseg_config(cfg)
    add_vit_config(cfg)
    add_vit_kmeans_config(cfg)
    cast.add_cast_config(cfg)
    cast.add_cast_semantic_config(cfg)
    add_cast_classification_config(cfg)
    add_cast_segmenter_config(cfg)
    oap.add_vit_adapter_config(cfg)
    oap.add_oap_config(cfg)
    return cfg
