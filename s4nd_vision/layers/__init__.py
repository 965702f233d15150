from .convnext_block import ConvNeXtS4NDBlock
from .glu import linear_glu
from .norm import ChannelLayerNorm, LayerNorm3d
from .ops import avg_pool_axes, channel_major, channels_first, conv_algorithm, separable_conv, two_sided_kernel
from .records import state_dict_without_records
from .recurrent import S4NDRecurrence
from .reference import reference_formulation
from .s4_kernel import S4Kernel
from .s4nd import (
    KERNELS,
    S4ND,
    check_kernel_args,
    drop_inference_caches,
    kernels_can_be_prepared,
    prepare_kernels,
    stacked_kernels,
)
from .sgconv_kernel import SGConvKernel, sgconv_weights
from .ssm_kernel import SSM_INITS, SSMKernel, set_bandlimit, ssm_init_b, ssm_init_imag, ssm_parameters
