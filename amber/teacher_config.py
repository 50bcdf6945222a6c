"""`teacher.config`: a QwenImageTransformer2DModel config, typed.

The keys and defaults are diffusers' (`QwenImageTransformer2DModel.__init__`; its defaults
are Qwen-Image's), snake_case as in a diffusers `config.json`. Types are strict (12.7, 'two'
and true are not layer counts), unknown keys are refused, and the shapes must agree, so a
config that cannot build a model is refused at admission instead of failing in the score
stage. The upper bounds keep a typo from asking a CPU for a model of a trillion weights.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

Dim = Annotated[StrictInt, Field(ge=1, le=65536)]


class QwenImageConfig(BaseModel):
    """A QwenImageTransformer2DModel config (diffusers' field names and defaults)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    patch_size: Annotated[StrictInt, Field(ge=1, le=16)] = Field(
        2, description="patch_size: latent patch side (Qwen-Image: 2)."
    )
    in_channels: Dim = Field(64, description="in_channels: packed latent channels.")
    out_channels: Dim | None = Field(16, description="out_channels: latent channels.")
    num_layers: Annotated[StrictInt, Field(ge=2, le=512)] = Field(
        60, description="num_layers: dual-stream blocks (Qwen-Image: 60)."
    )
    attention_head_dim: Annotated[StrictInt, Field(ge=2, le=1024)] = Field(
        128, description="attention_head_dim: width of one head."
    )
    num_attention_heads: Annotated[StrictInt, Field(ge=1, le=512)] = Field(
        24, description="num_attention_heads: heads per block."
    )
    joint_attention_dim: Dim = Field(3584, description="joint_attention_dim: text width.")
    guidance_embeds: StrictBool = Field(False, description="guidance_embeds.")
    axes_dims_rope: list[Annotated[StrictInt, Field(ge=2, le=1024)]] = Field(
        [16, 56, 56],
        min_length=3,
        max_length=3,
        description="axes_dims_rope: RoPE widths of the frame, height and width axes; they "
        "sum to attention_head_dim.",
    )
    zero_cond_t: StrictBool = Field(False, description="zero_cond_t.")
    use_additional_t_cond: StrictBool = Field(False, description="use_additional_t_cond.")
    use_layer3d_rope: StrictBool = Field(False, description="use_layer3d_rope.")

    @model_validator(mode="after")
    def _shapes(self):
        problems = []
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            problems.append(
                f"axes_dims_rope: {self.axes_dims_rope} sums to {sum(self.axes_dims_rope)}, "
                f"not attention_head_dim ({self.attention_head_dim})"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            problems.append("axes_dims_rope: RoPE rotates pairs; every width must be even")
        out = self.out_channels or self.in_channels
        if self.patch_size**2 * out != self.in_channels:
            problems.append(
                f"in_channels: {self.in_channels} must be patch_size² x out_channels "
                f"({self.patch_size}² x {out}): the model predicts the packed latents it reads"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def given(self) -> dict:
        """The fields the resource set, as diffusers reads them."""
        return self.model_dump(mode="json", exclude_unset=True)
