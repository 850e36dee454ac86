"""Raw data -> prepared graph and features. One module per dataset format, plus text, graph and embeddings.

``PREPARERS[name](root, out_dir, **options)`` prepares a dataset into the format of scanet.data.prepared.
"""
from scanet.data.prepared import PreparedDataset, Split  # noqa: F401


def _wiki(root, out_dir=None, **kw):
    from scanet.data import wiki

    return wiki.prepare(root, out_dir, **kw)


def _synthetic(root=None, out_dir=None, **kw):
    from scanet.data import synthetic

    return synthetic.prepare(out_dir, **kw)


def _webnews(root, out_dir=None, **kw):
    from scanet.data import webnews

    return webnews.prepare(root, out_dir, **kw)


def _custom(root, out_dir=None, **kw):
    from scanet.data import custom

    return custom.prepare(root, out_dir, **kw)


def _nuswide(root, out_dir=None, **kw):
    from scanet.data import nuswide

    return nuswide.prepare(root, out_dir, **kw)


def _pascal(root, out_dir=None, **kw):
    from scanet.data import pascal

    return pascal.prepare(root, out_dir, **kw)


def _pascal_sentences(root, out_dir=None, **kw):
    from scanet.data import pascal_sentences

    return pascal_sentences.prepare(root, out_dir, **kw)


PREPARERS = {"wiki": _wiki, "synthetic": _synthetic, "webnews": _webnews, "custom": _custom, "nuswide": _nuswide,
             "pascal": _pascal, "pascal-sentences": _pascal_sentences}


def prepare(name: str, root=None, out_dir=None, **options) -> PreparedDataset:
    if name not in PREPARERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(PREPARERS))}")
    if root is None and name != "synthetic":
        raise ValueError(f"dataset {name!r} needs --root DIR (its raw data)")
    return PREPARERS[name](root, out_dir, **options)
