"""Offline tasks: real data that ships with scikit-learn, scikit-image and Debian; no download."""

from jaxmerge.tasks.registry import Task, register

register(
    Task(
        "digits",
        "sklearn_digits",
        "classification",
        10,
        flip=False,
        about="scikit-learn 8x8 digits, 10 classes",
    )
)
register(
    Task(
        "digits_value",
        "sklearn_digits",
        "regression",
        1,
        target="value",
        spec={"mean": 4.5, "std": 2.87, "loss": "l1"},
        flip=False,
        about="scikit-learn digits, the digit's value as regression (MAE)",
    )
)
register(
    Task(
        "fashion_mnist",
        "fashion_mnist_idx",
        "classification",
        10,
        about="Fashion-MNIST from the Debian idx files, 10 classes (pretraining)",
    )
)
register(
    Task(
        "textures",
        "skimage_textures/size32",
        "classification",
        5,
        about="scikit-image textures (brick, grass, gravel, moon, stars), 5 classes",
    )
)
register(
    Task(
        "lfw_faces",
        "lfw_subset",
        "classification",
        2,
        about="scikit-image lfw_subset, face vs non-face",
    )
)
register(
    Task(
        "digit_box",
        "digit_box",
        "landmarks",
        2 * 2,
        target="landmarks",
        spec={"norm_points": (0, 1)},
        flip=False,
        about="scikit-learn digits pasted on a canvas, box corners (NME, box diagonal)",
    )
)
register(
    Task(
        "photo_scenes",
        "photo_scenes",
        "classification",
        8,
        about="crops of eight scikit-image photographs, which photograph (8 classes)",
    )
)
