"""Probe for docs/quality.md (not a feature): calibrate every pixel of the anomaly map by the
held-out maps of the training normals, and report validation (synthetic lesions) and test numbers.

Five-fold: PaDiM is fitted on 4/5 of the training images and scores the other 1/5, so each of the
130 fastMRI normals gets an out-of-sample map; their per-pixel mean (and standard deviation) is
the normal level of that pixel. Variants: ``sub`` (map - mean) and ``z`` ((map - mean) / std, the
std floored at a fraction of its median). The final model is fitted on all training images.

    python docs/calibration_probe.py [configs/fast_ixi.yaml]      # ~2 min on 2 cores
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE)); sys.path.insert(0, HERE)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.data import load_data, make_loader
from utils.model import Padim, ScoreResult
from utils.scoring import image_scores
from utils.evaluation import run_evaluation
from utils import metrics as M
import synthetic_val as SV

config = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(HERE), "configs", "fast_ixi.yaml")
K = 5
settings = load_config(config).replace(results_dir=os.path.join(os.path.dirname(HERE), "results"))
train = load_data(settings, ("train",)).train
images = torch.cat([b["image"] for b in make_loader(train, settings)])
n = len(images)
held = np.zeros((n, settings.image_size, settings.image_size), np.float32)
t = time.perf_counter()
for k in range(K):
    test_idx = np.arange(n)[np.arange(n) % K == k]
    fit_idx = np.arange(n)[np.arange(n) % K != k]
    m = Padim(settings).fit(images[fit_idx], progress=False)
    held[test_idx] = m.score(images[test_idx], progress=False).maps
print("kfold", time.perf_counter() - t, "s")
mu, sd = held.mean(0), held.std(0)

class Calibrated(Padim):
    mode = "sub"
    def score(self, imgs, progress=True, region=None):
        r = super().score(imgs, progress, region)
        maps = r.maps - mu if self.mode == "sub" else (r.maps - mu) / np.maximum(sd, np.median(sd) * FLOOR)
        maps = maps.astype(np.float32)
        return ScoreResult(maps, image_scores(torch.from_numpy(maps), self.settings.image_score, region).numpy())

for mode, FLOOR in (("sub", 0), ("z", 0.5), ("z", 1.0)):
    model = Calibrated(settings).fit(images, progress=False)
    model.mode = mode
    clean, sick, masks, bc, bs = SV.synthetic_set(settings, 10)
    sm, cm = model.score(sick, progress=False).maps, model.score(clean, progress=False).maps
    mm, b = masks.numpy(), bs.numpy()
    a, ap = M.pixel_metrics(sm, mm); bb = M.pixel_auroc(sm, mm, b | mm)
    c = M.image_auroc(image_scores(torch.from_numpy(sm), settings.image_score, bs | masks).numpy(),
                      image_scores(torch.from_numpy(cm), settings.image_score, bc).numpy())
    print(mode, FLOOR, f"val A {a:.3f} AP {ap:.3f} B {bb:.3f} C {c:.3f} mean {(a+ap+bb+c)/4:.3f}", flush=True)
    ev = run_evaluation(settings, model=model, progress=False, figures=False, save_model=False)
    row = ev.table.set_index("group").loc["mean"]
    print(mode, FLOOR, f"test A {row['A_auroc']:.3f} AP {row['A_ap']:.3f} B {row['B_auroc']:.3f} C {row['C_auroc']:.3f}", flush=True)
