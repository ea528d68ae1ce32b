"""The Xenith decoder and its parts."""

from xenith.model.attention import Attention
from xenith.model.attention import dot_product_attention
from xenith.model.masks import make_attention_mask
from xenith.model.transformer import Decoder
from xenith.model.transformer import DecoderBlock
from xenith.model.build import make_model
