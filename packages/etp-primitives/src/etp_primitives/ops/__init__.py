"""Built-in ETP primitives, each registered through the public spec machinery."""

from ._conv import conv, etp_conv_p
from ._dense import etp_mm_p, etp_mv_p, matmul
from ._einsum import EinsumLayout, einsum, einsum_layout, etp_einsum_p
from ._elemwise import element_wise, etp_elemwise_p
from ._embedding import EMBEDDING_MODES, embedding, etp_embedding_p
from ._grouped import etp_grouped_mm_p, etp_grouped_mv_p, grouped_matmul
from ._lora import etp_lora_mm_p, etp_lora_mv_p, lora_matmul
from ._sparse import SparseStructure, etp_sp_mm_p, etp_sp_mv_p, sparse_matmul

__all__ = [
    "matmul",
    "element_wise",
    "conv",
    "sparse_matmul",
    "lora_matmul",
    "SparseStructure",
    "einsum",
    "EinsumLayout",
    "einsum_layout",
    "grouped_matmul",
    "embedding",
    "EMBEDDING_MODES",
    "etp_mm_p",
    "etp_mv_p",
    "etp_elemwise_p",
    "etp_conv_p",
    "etp_sp_mm_p",
    "etp_sp_mv_p",
    "etp_lora_mm_p",
    "etp_lora_mv_p",
    "etp_einsum_p",
    "etp_grouped_mm_p",
    "etp_grouped_mv_p",
    "etp_embedding_p",
]
