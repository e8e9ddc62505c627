"""The paper's six tasks (Kesim & Helli 2024), on datasets the user downloads by hand.

Images at 224 px for ViT-B/16. The 3 FireRisk classes and the 9 UTKFace age bins are jaxmerge's
choices (see jaxmerge/datasets/firerisk.py and utkface.py).
"""

from jaxmerge.datasets import wflw
from jaxmerge.tasks.registry import Task, register

register(
    Task(
        "firerisk",
        "firerisk/size224",
        "classification",
        3,
        eval_split="validation",
        suite="paper",
        about="FireRisk aerial images, fire risk in 3 classes",
    )
)
register(
    Task(
        "utkface_age_class",
        "utkface/size224",
        "classification",
        9,
        target="age_class",
        suite="paper",
        about="UTKFace faces, age in 9 classes",
    )
)
register(
    Task(
        "utkface_age",
        "utkface/size224",
        "regression",
        1,
        target="age",
        spec={"mean": 33.3, "std": 19.9, "loss": "l1"},
        suite="paper",
        about="UTKFace faces, age regression (MAE in years)",
    )
)
register(
    Task(
        "expw",
        "expw/size224",
        "classification",
        7,
        suite="paper",
        about="ExpW faces, 7 facial expressions",
    )
)
register(
    Task(
        "wflw",
        "wflw/size224",
        "landmarks",
        2 * 98,
        target="landmarks",
        spec={"norm_points": (60, 72)},
        flip_permutation=tuple(int(i) for i in wflw.FLIP_PERMUTATION),  # JSON-ready ints
        suite="paper",
        about="WFLW faces, 98 landmarks (NME, inter-ocular)",
    )
)
register(
    Task(
        "galaxy10",
        "galaxy10_decals/size224",
        "classification",
        10,
        suite="paper",
        about="Galaxy10 DECals galaxy morphology, 10 classes",
    )
)
