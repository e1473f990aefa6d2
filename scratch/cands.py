"""Candidate conv/pool formulations for LeNet-5 (scratch)."""
import flax.linen as nn
import jax, jax.numpy as jnp
from jax import lax

# ---- NHWC convs: f(x_BHWC, kernel_hwio, pad) -> BHWF (no bias)
def conv_im2col(x, k, p):
    kh, kw, ci, f = k.shape
    x = jnp.pad(x, ((0,0),(p,p),(p,p),(0,0))) if p else x
    ho, wo = x.shape[1]-kh+1, x.shape[2]-kw+1
    pt = jnp.concatenate([x[:, i:i+ho, j:j+wo, :] for i in range(kh) for j in range(kw)], -1)
    return pt @ k.reshape(kh*kw*ci, f)

def conv_lax_nhwc(x, k, p):
    return lax.conv_general_dilated(x, k, (1,1), [(p,p),(p,p)], dimension_numbers=('NHWC','HWIO','NHWC'))

def conv_lax_nchw(x, k, p):
    y = lax.conv_general_dilated(x.transpose(0,3,1,2), k.transpose(3,2,0,1), (1,1), [(p,p),(p,p)],
                                 dimension_numbers=('NCHW','OIHW','NCHW'))
    return y.transpose(0,2,3,1)

def conv_shift(x, k, p):
    kh, kw, ci, f = k.shape
    x = jnp.pad(x, ((0,0),(p,p),(p,p),(0,0))) if p else x
    ho, wo = x.shape[1]-kh+1, x.shape[2]-kw+1
    out = 0.
    for i in range(kh):
        for j in range(kw):
            out = out + x[:, i:i+ho, j:j+wo, :] @ k[i, j]
    return out

def conv_toeplitz(x, k, p):
    """rows: out[b,h,(w,f)] = sum_i xpad[b,h+i,(w',c)] @ T_i[(w',c),(w,f)]"""
    kh, kw, ci, f = k.shape
    x = jnp.pad(x, ((0,0),(p,p),(p,p),(0,0))) if p else x
    b, hp, wp, _ = x.shape
    ho, wo = hp-kh+1, wp-kw+1
    import numpy as np
    S = np.zeros((wp, wo, kw), np.float32)
    for w in range(wo):
        for j in range(kw):
            S[w+j, w, j] = 1
    T = jnp.einsum('pwj,ijcf->ipcwf', S, k).reshape(kh*wp*ci, wo*f)
    xr = x.reshape(b, hp, wp*ci)
    rows = jnp.concatenate([xr[:, i:i+ho, :] for i in range(kh)], -1)  # b,ho,kh*wp*ci
    return (rows @ T).reshape(b, ho, wo, f)

def pool_reshape(x):
    b,h,w,c = x.shape
    return x.reshape(b,h//2,2,w//2,2,c).max(axis=(2,4))

def pool_slices(x):
    return jnp.maximum(jnp.maximum(x[:, ::2, ::2], x[:, ::2, 1::2]), jnp.maximum(x[:, 1::2, ::2], x[:, 1::2, 1::2]))

def pool_flax(x):
    return nn.max_pool(x, (2,2), strides=(2,2))

# ---- CBHW layout (channels, batch, H, W) internal
def conv_cbhw(x, k, p):
    """x: (C,B,H,W) -> (F,B,Ho,Wo): K-major im2col, W^T(F,K) @ P(K,N)."""
    kh, kw, ci, f = k.shape
    x = jnp.pad(x, ((0,0),(0,0),(p,p),(p,p))) if p else x
    c, b, hp, wp = x.shape
    ho, wo = hp-kh+1, wp-kw+1
    pt = jnp.concatenate([x[:, :, i:i+ho, j:j+wo] for i in range(kh) for j in range(kw)], 0)  # (kh*kw*C, B, ho, wo)
    out = k.reshape(kh*kw*ci, f).T @ pt.reshape(kh*kw*ci, b*ho*wo)
    return out.reshape(f, b, ho, wo)

def pool_cbhw_reshape(x):
    c,b,h,w = x.shape
    return x.reshape(c,b,h//2,2,w//2,2).max(axis=(3,5))

def pool_cbhw_slices(x):
    return jnp.maximum(jnp.maximum(x[..., ::2, ::2], x[..., ::2, 1::2]), jnp.maximum(x[..., 1::2, ::2], x[..., 1::2, 1::2]))


class CandConv(nn.Module):
    features: int
    kernel_size: tuple
    padding: int = 0
    impl: object = conv_im2col
    @nn.compact
    def __call__(self, x, cin):
        kh, kw = self.kernel_size
        k = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, cin, self.features))
        bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
        return self.impl(x, k, self.padding), bias


class LeNetNHWC(nn.Module):
    conv1: object = conv_im2col
    conv2: object = conv_im2col
    pool: object = pool_reshape
    @nn.compact
    def __call__(self, x, *, train=False):
        y, b = CandConv(6, (5,5), 2, self.conv1, name='conv1')(x, 1)
        x = self.pool(nn.relu(y + b))
        y, b = CandConv(16, (5,5), 0, self.conv2, name='conv2')(x, 6)
        x = self.pool(nn.relu(y + b))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name='fc1')(x))
        x = nn.relu(nn.Dense(84, name='fc2')(x))
        return nn.Dense(10, name='fc3')(x)


class LeNetCBHW(nn.Module):
    pool: object = pool_cbhw_reshape
    @nn.compact
    def __call__(self, x, *, train=False):
        x = x.transpose(3, 0, 1, 2)  # (1,B,28,28): free for C=1
        y, b = CandConv(6, (5,5), 2, conv_cbhw, name='conv1')(x, 1)
        x = self.pool(nn.relu(y + b[:, None, None, None]))
        y, b = CandConv(16, (5,5), 0, conv_cbhw, name='conv2')(x, 6)
        x = self.pool(nn.relu(y + b[:, None, None, None]))  # (16,B,5,5)
        x = x.transpose(1, 2, 3, 0).reshape(x.shape[1], -1)
        x = nn.relu(nn.Dense(120, name='fc1')(x))
        x = nn.relu(nn.Dense(84, name='fc2')(x))
        return nn.Dense(10, name='fc3')(x)


# ---- fast pool: custom VJP that routes the gradient to the FIRST max of each window
#      (what nn.max_pool's select-and-scatter does), as one elementwise select.
@jax.custom_vjp
def pool_fast(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

def _pf_fwd(x):
    m = pool_fast(x)
    return m, (x, m)

def _pf_bwd(res, g):
    x, m = res
    b, h, w, c = x.shape
    v = x.reshape(b, h // 2, 2, w // 2, 2, c)
    q = [v[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)]
    taken = jnp.zeros(m.shape, bool)
    outs = []
    for t in q:
        sel = (t == m) & ~taken
        taken = taken | sel
        outs.append(jnp.where(sel, g, 0.0))
    dx = jnp.stack([jnp.stack(outs[0:2], 3), jnp.stack(outs[2:4], 3)], 2)  # b,h2,2,w2,2,c
    return (dx.reshape(b, h, w, c),)

pool_fast.defvjp(_pf_fwd, _pf_bwd)


class LeNetFP(nn.Module):
    """conv (no bias) -> pool -> +bias -> relu (same values: max commutes with +b and relu)."""
    conv1: object = conv_im2col
    conv2: object = conv_im2col
    pool: object = pool_fast
    @nn.compact
    def __call__(self, x, *, train=False):
        y, b = CandConv(6, (5,5), 2, self.conv1, name='conv1')(x, 1)
        x = nn.relu(self.pool(y) + b)
        y, b = CandConv(16, (5,5), 0, self.conv2, name='conv2')(x, 6)
        x = nn.relu(self.pool(y) + b)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name='fc1')(x))
        x = nn.relu(nn.Dense(84, name='fc2')(x))
        return nn.Dense(10, name='fc3')(x)
