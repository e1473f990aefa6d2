import jax, jax.numpy as jnp, numpy as np, optax
from scratch.cands import *
from fmnist_jax.models import LeNet5
ref = LeNet5()
x = jax.random.normal(jax.random.key(1), (8,28,28,1)); lab = jnp.arange(8) % 10
params = ref.init(jax.random.key(0), x)
def lg(m):
    f = lambda p: optax.softmax_cross_entropy_with_integer_labels(m.apply(p, x), lab).mean()
    return jax.jit(jax.value_and_grad(f))(params)
l0, g0 = lg(ref)
cands = dict(lax_nhwc=LeNetNHWC(conv_lax_nhwc, conv_lax_nhwc), lax_nchw=LeNetNHWC(conv_lax_nchw, conv_lax_nchw),
             shift1=LeNetNHWC(conv_shift, conv_im2col), toep1=LeNetNHWC(conv_toeplitz, conv_im2col),
             toep12=LeNetNHWC(conv_toeplitz, conv_toeplitz), poolsl=LeNetNHWC(pool=pool_slices),
             cbhw=LeNetCBHW(), cbhw_sl=LeNetCBHW(pool_cbhw_slices), fp=LeNetFP(), fp_toep1=LeNetFP(conv_toeplitz), fp_toep12=LeNetFP(conv_toeplitz, conv_toeplitz))
for n, m in cands.items():
    l, g = lg(m)
    err = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a-b))), g, g0)))
    print(n, float(abs(l-l0)), err)
