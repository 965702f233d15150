from .ops import conv_along_axis, fft_conv_along_axis, toeplitz_conv_along_axis, two_sided_kernel
from .s4nd import S4ND
from .ssm_kernel import SSM_INITS, SSMKernel, is_ssm_param, ssm_init_imag
