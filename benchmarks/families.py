"""The ``--families`` entries of the benchmarks: a family (``vae``, ``cevae``, ``vqvae``, ``gan``, ``ddpm``,
``flow``) at the default config, or ``family:space`` for one of the DDPM's spaces (``ddpm:pixel``)."""


def overrides(name: str) -> list[str]:
    family, _, space = name.partition(":")
    return [f"model.family={family}", *([f"model.space={space}"] if space else [])]
