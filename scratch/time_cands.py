import sys, statistics
from fmnist_jax.profiling import *
from scratch.cands import *
from fmnist_jax.models import LeNet5
names = sys.argv[1].split(',')
bs = [int(b) for b in sys.argv[2].split(',')]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 7
torch_too = len(sys.argv) > 4 and sys.argv[4] == 'torch'
allc = dict(cur=LeNet5(), lax_nhwc=LeNetNHWC(conv_lax_nhwc, conv_lax_nhwc), lax_nchw=LeNetNHWC(conv_lax_nchw, conv_lax_nchw),
             lax1=LeNetNHWC(conv_lax_nhwc, conv_im2col),
             shift1=LeNetNHWC(conv_shift, conv_im2col), toep1=LeNetNHWC(conv_toeplitz, conv_im2col),
             toep12=LeNetNHWC(conv_toeplitz, conv_toeplitz), poolsl=LeNetNHWC(pool=pool_slices),
             poolflax=LeNetNHWC(pool=pool_flax),
             cbhw=LeNetCBHW(), cbhw_sl=LeNetCBHW(pool_cbhw_slices),
 fp=LeNetFP(), fp_rs=LeNetFP(pool=pool_reshape), fp_toep1=LeNetFP(conv_toeplitz), fp_toep12=LeNetFP(conv_toeplitz, conv_toeplitz), fp_shift1=LeNetFP(conv_shift))
for b in bs:
    im, lb = random_images(max(4096, 4*b))
    runners = {}
    if torch_too: runners['torch'] = TorchEpoch(im, lb, b).run
    for n in names: runners[n] = JaxEpoch(allc[n], im, lb, b).run
    t = interleaved(runners, rounds)
    base = 'torch' if torch_too else names[0]
    N = len(lb)//b*b
    print(f'b={b}', '  '.join(f'{k}: med {statistics.median(v)/N*1e6:.1f} min {min(v)/N*1e6:.1f} us/img (x{statistics.median(v)/statistics.median(t[base]):.3f} med, x{min(v)/min(t[base]):.3f} min vs {base})' for k, v in t.items()), flush=True)
