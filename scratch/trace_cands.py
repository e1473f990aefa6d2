import sys, glob, gzip, json, collections, shutil, re
import jax
from fmnist_jax.profiling import *
from scratch.cands import *
from fmnist_jax.models import LeNet5
allc = dict(cur=LeNet5(), toep1=LeNetNHWC(conv_toeplitz, conv_im2col), toep12=LeNetNHWC(conv_toeplitz, conv_toeplitz), cbhw=LeNetCBHW())
b = int(sys.argv[2]); steps = 20
im, lb = random_images(b*steps)
for n in sys.argv[1].split(','):
    j = JaxEpoch(allc[n], im, lb, b)
    hlo = j.fn.as_text()
    meta = {}
    for line in hlo.splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*op_name="([^"]+)"', line)
        if m: meta[m.group(1)] = (m.group(2)[:28], m.group(3).split('closed_call/')[-1][:60])
    shutil.rmtree('/tmp/jt', ignore_errors=True)
    j.run()
    jax.profiler.start_trace('/tmp/jt', create_perfetto_trace=True); j.run(); jax.profiler.stop_trace()
    ev = json.load(gzip.open(glob.glob('/tmp/jt/**/*.trace.json.gz', recursive=True)[0]))
    ev = ev['traceEvents'] if isinstance(ev, dict) else ev
    d = collections.Counter()
    for e in ev:
        if e.get('ph') == 'X' and e['name'] in meta: d[e['name']] += e['dur']
    tot = sum(d.values())/steps
    print(f'== {n} batch {b}: sum of thunks {tot:.0f} us/step = {tot/b:.1f} us/img')
    for k, v in d.most_common(14): print(f'  {v/steps:8.0f} us {100*v/steps/tot:5.1f}%  {k:28s} {meta[k][0]:28s} {meta[k][1]}')
