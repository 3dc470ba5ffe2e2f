# st_compare.py A B [TOL]: two safetensors files of the same f32 tensors; prints the
# per-tensor differences and exits 0 when the relative L2 error over all
# tensors together is at most TOL (default 1e-5).
import json,struct,sys,numpy as np
def load(p):
    d=open(p,'rb').read();n=struct.unpack('<Q',d[:8])[0];h=json.loads(d[8:8+n]);base=8+n;out={}
    for k,v in h.items():
        if k=='__metadata__':continue
        a,b=v['data_offsets'];out[k]=np.frombuffer(d[base+a:base+b],dtype=np.float32)
    return out
a=load(sys.argv[1]);b=load(sys.argv[2]);tol=float(sys.argv[3]) if len(sys.argv)>3 else 1e-5
assert a.keys()==b.keys()
worst=max((np.linalg.norm(a[k]-b[k])/max(np.linalg.norm(a[k]),1e-30),k) for k in a)
nd=sum(1 for k in a if not np.array_equal(a[k],b[k]))
A=np.concatenate([a[k] for k in a]);B=np.concatenate([b[k] for k in a])
rel=np.linalg.norm(A-B)/np.linalg.norm(A)
print("tensors %d, differing %d, all together rel L2 %.3g (tolerance %g), worst tensor %.3g (%s)"%(len(a),nd,rel,tol,worst[0],worst[1]))
sys.exit(0 if rel<=tol and np.isfinite(B).all() else 1)
