"""What validation conditions the UNet on: one row per prompt, per class, or per (prompt, class).

`train.conditioning` decides: 'text' validates `sample.prompts`; 'class' validates the classes
(`sample.class_labels`, default every class of the encode manifest) with the empty caption as
text input, as training gave it; 'text+class' validates every prompt with every class. The toy
judge's shape target of a row is its class when the classes are toy shapes (`encode.class_field`
= 'shape'), else its prompt's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import PipelineConfig
from pipeline.core.toy import SHAPES, parse_caption


@dataclass(frozen=True)
class Conditions:
    """Validation rows: `texts` label the grids (and are what CLIP scores against); `prompts[i]` is row
    i's caption (None: the empty caption); `labels[i]` its class index (None without classes)."""

    texts: list[str]
    prompts: list[str | None]
    class_names: list[str | None]
    labels: list[int] | None
    null_class: int | None

    def __len__(self) -> int:
        return len(self.texts)

    def shape_targets(self) -> list[str | None]:
        """The toy shape each row should show, or None where neither its class nor its prompt names one."""
        targets = []
        for prompt, name in zip(self.prompts, self.class_names):
            if name is not None and self.null_class is not None and name in SHAPES:
                targets.append(name)
            elif prompt is not None:
                try:
                    targets.append(parse_caption(prompt).shape)
                except ValueError:
                    targets.append(None)
            else:
                targets.append(None)
        return targets


def validation_conditions(config: PipelineConfig, manifest: dict) -> Conditions:
    """The rows to validate; raises ValueError naming the key when the config and the manifest disagree."""
    conditioning, sample = config.train.conditioning, config.sample
    if "class" not in conditioning:
        return Conditions(list(sample.prompts), list(sample.prompts), [None] * len(sample.prompts), None, None)
    classes = manifest.get("classes")
    if not classes:
        raise ValueError(f"train.conditioning = {conditioning!r}, but the encode manifest lists no classes")
    names = list(sample.class_labels or classes)
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise ValueError(f"sample.class_labels {unknown} are not classes of this run (the encode manifest has {classes})")
    if conditioning == "class":
        return Conditions(names, [None] * len(names), names, [classes.index(n) for n in names], len(classes))
    pairs = [(prompt, name) for prompt in sample.prompts for name in names]
    return Conditions(
        [f"{prompt} [{name}]" for prompt, name in pairs],
        [p for p, _ in pairs],
        [n for _, n in pairs],
        [classes.index(n) for _, n in pairs],
        len(classes),
    )
