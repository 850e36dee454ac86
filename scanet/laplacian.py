"""The prepared word-graph operator L~ (rescaled Laplacian) as one object, and its input checks.

The Laplacian is prepared once (scanet.data.graph: scipy CSR, saved in the prepared data) and from then on
lives as a ``Laplacian``: a module holding three buffers (``crow``, ``col``, ``values``; they move with
``.to(device)`` and travel in the checkpoint), checked ONCE when built (square, sorted in-range indices, a
well-formed row pointer), with its ``symmetric`` flag computed once and, only when L~ is not symmetric, its
transpose kept as non-persistent buffers (backward propagates with L~^T). Loading a state_dict into it
re-runs the preparation: the flag and the transpose always describe the values in the buffers.

``reference.cheb_conv``, ``fused.cheb_conv`` and ``native.cheb_conv`` accept a ``Laplacian`` or a raw torch
sparse CSR tensor. A raw CSR's index arrays are checked ONCE per tensor (``check_laplacian`` remembers the
tensors it has checked, by identity and the version counters of their index arrays, so an in-place change is
checked again): an out-of-range column or a malformed row pointer is a ValueError, never garbage from reading
outside an array, never a segfault in torch.sparse.mm or the native op. The CSR views a ``Laplacian`` hands
out (``csr()``) are born checked. Memory: three int64/float arrays, (V + 1) + 2 nnz words; the Wiki graph
(V = 10,055, nnz ~ 160k) is ~2.6 MB, twice that when a transpose is kept.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn


def _fail(msg: str):
    raise ValueError(msg)


# id(raw CSR tensor) -> what it was when its indices were checked (see _csr_key); entries leave with the tensor.
_CHECKED: dict[int, tuple] = {}
# id(raw CSR tensor) -> (its key, the Laplacian built from it) for Laplacian.of; entries leave with the tensor.
_OPERATORS: dict[int, tuple] = {}


def _csr_key(t: torch.Tensor) -> tuple:
    crow, col = t.crow_indices(), t.col_indices()
    return (crow.data_ptr(), col.data_ptr(), crow._version, col._version, tuple(t.shape), str(crow.device))


def _remember_checked(t: torch.Tensor) -> torch.Tensor:
    """Record that ``t``'s index arrays are valid (a finalizer forgets it when ``t`` is freed)."""
    i = id(t)
    if i not in _CHECKED:
        weakref.finalize(t, _CHECKED.pop, i, None)
    _CHECKED[i] = _csr_key(t)
    return t


def check_laplacian(laplacian_csr: torch.Tensor, *, check_indices: bool = True) -> None:
    """Raise a clear error unless ``laplacian_csr`` is a square sparse CSR matrix with valid, sorted indices.

    The index checks (a pass over crow and col) run once per tensor: a tensor checked before, whose index
    arrays have not been written since, is not checked again."""
    if not isinstance(laplacian_csr, torch.Tensor):
        _fail(
            f"laplacian_csr must be a torch sparse CSR tensor or a scanet.laplacian.Laplacian, got "
            f"{type(laplacian_csr).__name__}"
        )
    if laplacian_csr.layout != torch.sparse_csr:
        _fail(
            f"laplacian_csr must have layout torch.sparse_csr, got {laplacian_csr.layout} "
            "(convert with .to_sparse_csr(), or scanet.data.graph.to_torch_csr for a scipy matrix)"
        )
    if laplacian_csr.dim() != 2 or laplacian_csr.shape[0] != laplacian_csr.shape[1]:
        _fail(f"laplacian_csr must be square (V, V), got shape {tuple(laplacian_csr.shape)}")
    if not laplacian_csr.dtype.is_floating_point:
        _fail(f"laplacian_csr must be floating point, got {laplacian_csr.dtype}")
    if check_indices and _CHECKED.get(id(laplacian_csr)) != _csr_key(laplacian_csr):
        crow, col = laplacian_csr.crow_indices(), laplacian_csr.col_indices()
        if laplacian_csr.values().numel() != col.numel():
            _fail(f"laplacian_csr has {col.numel()} column indices but {laplacian_csr.values().numel()} values")
        check_csr_indices(crow, col, laplacian_csr.shape[0])
        _remember_checked(laplacian_csr)


def check_csr_indices(crow: torch.Tensor, col: torch.Tensor, V: int) -> None:
    """Column indices in [0, V) and sorted within each row; crow a non-decreasing pointer from 0 to nnz."""
    if crow.dim() != 1 or col.dim() != 1:
        _fail(f"laplacian_csr index arrays must be 1-D, got crow {tuple(crow.shape)}, col {tuple(col.shape)}")
    if crow.numel() != V + 1 or int(crow[0]) != 0 or int(crow[-1]) != col.numel() or bool((crow[1:] < crow[:-1]).any()):
        _fail(
            f"laplacian_csr has a malformed crow_indices array (it must hold V + 1 = {V + 1} non-decreasing "
            f"row offsets from 0 to nnz = {col.numel()})"
        )
    if col.numel():
        if int(col.min()) < 0 or int(col.max()) >= V:
            _fail(f"laplacian_csr has column indices out of range [0, {V}): min {int(col.min())}, max {int(col.max())}")
        # Sorted within each row: a decrease is only allowed where a new row starts.
        dec = (col[1:] < col[:-1]).nonzero().flatten() + 1
        if dec.numel():
            row_starts = crow[1:-1]
            if not torch.isin(dec, row_starts).all():
                _fail(
                    "laplacian_csr has unsorted column indices within a row "
                    "(sort them, e.g. scipy's .sort_indices() before conversion)"
                )


def transpose_arrays(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, V: int):
    """(crow, col, values) of A^T with torch ops: a stable sort by (column, row); sorted columns in every row."""
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(V, device=col.device, dtype=col.dtype), counts)
    order = torch.argsort(col.to(torch.int64) * V + rows.to(torch.int64), stable=True)
    crow_t = torch.zeros(V + 1, dtype=crow.dtype, device=crow.device)
    crow_t[1:] = torch.cumsum(torch.bincount(col.to(torch.int64), minlength=V), 0).to(crow.dtype)
    return crow_t, rows[order].contiguous(), values[order].contiguous()


def is_symmetric(crow, col, values, crow_t, col_t, values_t, rel_tol: float | None = None) -> bool:
    """Same pattern and values equal within rel_tol * max|value| (default 8 ulp of the dtype).

    A tolerance, not bitwise equality: D^-1/2 A D^-1/2 computed in floating point is symmetric only up to an
    ulp or so, and using L~ for L~^T then changes the gradient by that much.
    """
    if col.numel() != col_t.numel() or not (torch.equal(crow, crow_t) and torch.equal(col, col_t)):
        return False
    if values.numel() == 0:
        return True
    if rel_tol is None:
        rel_tol = 8 * torch.finfo(values.dtype).eps
    return bool(((values - values_t).abs() <= rel_tol * values.abs().max()).all())


def _arrays_of(laplacian) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """int64 crow, int64 col, float values and V of (crow, col, values), a torch sparse tensor or a scipy matrix."""
    if isinstance(laplacian, tuple):
        crow, col, values = (torch.as_tensor(a) for a in laplacian)
        if crow.dim() != 1 or col.dim() != 1 or values.dim() != 1 or crow.numel() < 1:
            _fail(
                f"Laplacian arrays must be 1-D crow (V+1), col and values (nnz), got shapes "
                f"{tuple(crow.shape)}, {tuple(col.shape)}, {tuple(values.shape)}"
            )
        return crow.long(), col.long(), values.detach(), crow.numel() - 1
    if isinstance(laplacian, torch.Tensor):
        if laplacian.layout != torch.sparse_csr:
            if laplacian.layout == torch.strided or laplacian.dim() != 2:
                check_laplacian(laplacian, check_indices=False)  # the clear error for a dense / odd tensor
            laplacian = laplacian.to_sparse_csr()
        check_laplacian(laplacian, check_indices=False)
        if laplacian.requires_grad or laplacian.values().requires_grad:
            _fail(
                "the Laplacian is a constant, but laplacian_csr requires grad; use scanet.reference.cheb_conv "
                "with a raw CSR for gradients with respect to the Laplacian"
            )
        return (laplacian.crow_indices().long(), laplacian.col_indices().long(), laplacian.values(), laplacian.shape[0])
    import scipy.sparse as sp

    if not sp.issparse(laplacian):
        _fail(
            f"laplacian must be a scipy sparse matrix, a torch sparse CSR tensor or a Laplacian, got "
            f"{type(laplacian).__name__}"
        )
    if laplacian.shape[0] != laplacian.shape[1]:
        _fail(f"laplacian must be square (V, V), got shape {laplacian.shape}")
    csr = sp.csr_matrix(laplacian)
    csr.sort_indices()
    return (
        torch.from_numpy(csr.indptr.astype(np.int64)),
        torch.from_numpy(csr.indices.astype(np.int64)),
        torch.from_numpy(csr.data.astype(np.float32)),
        csr.shape[0],
    )


class Laplacian(nn.Module):
    """The rescaled Laplacian L~ = 2L/lmax - I of the word graph, prepared once (see the module docstring).

    ``Laplacian(matrix)``: a scipy sparse matrix, a torch sparse CSR (or COO) tensor, or the three arrays
    ``(crow, col, values)`` (also ``Laplacian.from_arrays``). ``csr(dtype)`` is the torch CSR view of the buffers
    (no copy unless a dtype cast is asked for); calling the module returns it too (``model.laplacian()``).
    ``transpose()`` is (crow, col, values) of L~^T: the buffers themselves when ``symmetric``.
    """

    crow: torch.Tensor  # buffers (register_buffer), declared for the type checker
    col: torch.Tensor
    values: torch.Tensor

    def __init__(self, laplacian):
        super().__init__()
        crow, col, values, V = _arrays_of(laplacian)
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("values", values)
        self._prepare()

    @classmethod
    def from_arrays(cls, crow, col, values) -> Laplacian:
        """From the three CSR arrays (a checkpoint's buffers), without building a CSR tensor first."""
        return cls((crow, col, values))

    @classmethod
    def of(cls, laplacian) -> Laplacian:
        """``laplacian`` itself when it is a Laplacian, else one built (and checked) from it. For a raw torch
        CSR the operator is built once per tensor and reused while the tensor lives unchanged (its index and
        value arrays' version counters), so the fused path does not re-check and re-transpose it per call."""
        if isinstance(laplacian, cls):
            return laplacian
        if isinstance(laplacian, torch.Tensor) and laplacian.layout == torch.sparse_csr and not laplacian.requires_grad:
            values = laplacian.values()
            key = _csr_key(laplacian) + (values.data_ptr(), values._version, str(values.dtype))
            hit = _OPERATORS.get(id(laplacian))
            if hit is not None and hit[0] == key:
                return hit[1]
            op = cls(laplacian)
            if id(laplacian) not in _OPERATORS:
                weakref.finalize(laplacian, _OPERATORS.pop, id(laplacian), None)
            _OPERATORS[id(laplacian)] = (key, op)
            return op
        return cls(laplacian)

    @property
    def size(self) -> int:
        return self.crow.numel() - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def nnz(self) -> int:
        return self.col.numel()

    def _prepare(self) -> None:
        """The checks and the transpose: run at construction and after a state_dict is loaded into it."""
        V = self.size
        if not self.values.dtype.is_floating_point:
            _fail(f"the Laplacian's values must be floating point, got {self.values.dtype}")
        if self.values.numel() != self.col.numel():
            _fail(f"the Laplacian has {self.col.numel()} column indices but {self.values.numel()} values")
        check_csr_indices(self.crow, self.col, V)
        crow_t, col_t, values_t = transpose_arrays(self.crow, self.col, self.values, V)
        self.symmetric = is_symmetric(self.crow, self.col, self.values, crow_t, col_t, values_t)
        keep = None if self.symmetric else (crow_t, col_t, values_t)
        for name, t in zip(("crow_t", "col_t", "values_t"), keep or (None, None, None), strict=True):
            self.register_buffer(name, t, persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare()  # new values in the same storage: the symmetric flag and transpose follow them

    def csr(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        values = self.values if dtype is None else self.values.to(dtype)
        return _remember_checked(
            torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)
        )  # checked in _prepare

    def transpose(self, dtype: torch.dtype | None = None):
        crow, col, values = (
            (self.crow, self.col, self.values) if self.symmetric else (self.crow_t, self.col_t, self.values_t)
        )
        return crow, col, values if dtype is None else values.to(dtype)

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.csr(dtype)

    def extra_repr(self) -> str:
        return f"V={self.size}, nnz={self.nnz}, symmetric={self.symmetric}"


def as_csr(laplacian, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The torch CSR of a Laplacian (cast to ``dtype`` when given), or a raw torch CSR passed through as is."""
    if isinstance(laplacian, Laplacian):
        return laplacian.csr(dtype)
    return laplacian
