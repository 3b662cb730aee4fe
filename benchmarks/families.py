"""The ``--families`` entries of the benchmarks: a family (``vae``, ``cevae``, ``vqvae``, ``gan``, ``ddpm``,
``flow``) at the default config, ``family:space`` for one of the DDPM's spaces (``ddpm:pixel``), and a
``+mask`` suffix for the mask-conditioned variant (``ddpm+mask``, ``ddpm:pixel+mask``, ``gan+mask``:
model.mask_conditioning=true)."""


def overrides(name: str) -> list[str]:
    name, plus, option = name.partition("+")
    if plus and option != "mask":
        raise ValueError(f"{name}+{option}: the only variant suffix is +mask (model.mask_conditioning=true)")
    family, _, space = name.partition(":")
    return [f"model.family={family}", *([f"model.space={space}"] if space else []),
            *(["model.mask_conditioning=true"] if plus else [])]
