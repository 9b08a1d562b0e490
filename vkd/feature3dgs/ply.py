"""Minimal PLY vertex I/O (binary little-endian write; binary or ASCII read) with numpy.

Only the ``vertex`` element is used: point clouds (x, y, z, red, green, blue) and 3DGS files (x, y, z, nx, ny,
nz, f_dc_*, f_rest_*, opacity, scale_*, rot_*; older vkd exports also carry per-Gaussian features ``f_sem_*``, which
are read like any other property). :func:`gaussian_ply_properties` is the standard 3DGS column order,
:func:`validate_gaussian_ply` checks a vertex table against it and :func:`read_gaussian_ply` reads a trained 3DGS
scene into :class:`~vkd.feature3dgs.model.GaussianField`'s parameter layout. No dependency on ``plyfile``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vkd.errors import DataError
from vkd.render.sh import num_sh_bases

__all__ = ["write_ply", "read_ply", "gaussian_ply_properties", "validate_gaussian_ply", "read_gaussian_ply"]

_PLY_TO_NP = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_NP_TO_PLY = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int", "u4": "uint",
              "f4": "float", "f8": "double"}


def write_ply(path: str | Path, columns: dict[str, np.ndarray]) -> Path:
    """Write a binary little-endian PLY with one ``vertex`` element.

    Args:
        path: output file.
        columns: property name -> ``[N]`` array (dtype kept: float32, uint8, ...); all of the same length.
    """
    path = Path(path)
    if not columns:
        raise ValueError("columns must not be empty")
    n = len(next(iter(columns.values())))
    dtype = []
    for name, arr in columns.items():
        arr = np.asarray(arr)
        if arr.ndim != 1 or len(arr) != n:
            raise ValueError(f"column {name!r} must have shape [{n}], got {arr.shape}")
        code = arr.dtype.str.lstrip("<>|=")
        if code not in _NP_TO_PLY:
            raise ValueError(f"column {name!r} has unsupported dtype {arr.dtype}")
        dtype.append((name, "<" + code))
    data = np.empty(n, dtype=dtype)
    for name, arr in columns.items():
        data[name] = arr
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {_NP_TO_PLY[d[1][1:]]} {d[0]}" for d in dtype]
    header.append("end_header")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(data.tobytes())
    return path


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read the ``vertex`` element of a PLY file (binary little/big endian or ASCII).

    Returns:
        property name -> ``[N]`` array.

    Raises:
        DataError: the file is missing or not a readable PLY.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"point cloud not found: {path}")
    with open(path, "rb") as fh:
        if fh.readline().strip() != b"ply":
            raise DataError(f"{path} is not a PLY file")
        fmt, elements, current = None, [], None
        while True:
            line = fh.readline()
            if not line:
                raise DataError(f"{path}: PLY header has no end_header")
            tokens = line.decode("ascii", errors="replace").split()
            if not tokens or tokens[0] in ("comment", "obj_info"):
                continue
            if tokens[0] == "end_header":
                break
            if tokens[0] == "format":
                fmt = tokens[1]
            elif tokens[0] == "element":
                current = {"name": tokens[1], "count": int(tokens[2]), "props": []}
                elements.append(current)
            elif tokens[0] == "property":
                if current is None:
                    raise DataError(f"{path}: property before element in PLY header")
                if tokens[1] == "list":
                    current["props"].append(("list", tokens[2], tokens[3], tokens[4]))
                else:
                    if tokens[1] not in _PLY_TO_NP:
                        raise DataError(f"{path}: unsupported PLY property type {tokens[1]}")
                    current["props"].append((tokens[2], _PLY_TO_NP[tokens[1]]))
        if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
            raise DataError(f"{path}: unsupported PLY format {fmt}")
        if not elements or elements[0]["name"] != "vertex":
            raise DataError(f"{path}: the first PLY element must be 'vertex'")
        vertex = elements[0]
        if any(p[0] == "list" for p in vertex["props"]):
            raise DataError(f"{path}: list properties in the vertex element are not supported")
        if fmt == "ascii":
            rows = [fh.readline().split() for _ in range(vertex["count"])]
            table = np.asarray(rows, dtype=np.float64).reshape(vertex["count"], len(vertex["props"]))
            return {name: table[:, i].astype(code) for i, (name, code) in enumerate(vertex["props"])}
        endian = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, endian + code) for name, code in vertex["props"]])
        raw = fh.read(dtype.itemsize * vertex["count"])
        if len(raw) < dtype.itemsize * vertex["count"]:
            raise DataError(f"{path}: PLY file is truncated")
        data = np.frombuffer(raw, dtype=dtype, count=vertex["count"])
        return {name: np.ascontiguousarray(data[name]).astype(data[name].dtype.newbyteorder("=")) for name in
                data.dtype.names}


_NORMALS = ("nx", "ny", "nz")


def gaussian_ply_properties(sh_degree: int) -> list[str]:
    """The vertex properties of a 3DGS PLY (Inria layout), in file order.

    ``x y z nx ny nz f_dc_0..2 f_rest_0..3(K-1)-1 opacity scale_0..2 rot_0..3`` with ``K = (sh_degree + 1)²``;
    ``f_rest`` is channel-major (all R coefficients, then G, then B).
    """
    if sh_degree < 0:
        raise ValueError(f"sh_degree must be >= 0, got {sh_degree}")
    num_rest = 3 * (num_sh_bases(sh_degree) - 1)
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(num_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def validate_gaussian_ply(table: dict[str, np.ndarray], source: str | Path = "PLY") -> int:
    """Check that a vertex table (from :func:`read_ply`) holds the properties 3DGS needs; return its SH degree.

    Normals are optional (3DGS writes zeros and never reads them); extra properties such as ``f_sem_*`` are allowed.

    Args:
        table: property name -> ``[N]`` array.
        source: the file name used in error messages.

    Returns:
        The SH degree implied by the ``f_rest_*`` count (``3 * ((d + 1)² - 1)`` properties).

    Raises:
        DataError: required properties are missing (all named in one line), or the ``f_rest_*`` count is not
            that of an SH degree.
    """
    rest_ids = sorted(int(k[len("f_rest_"):]) for k in table if k.startswith("f_rest_") and k[7:].isdigit())
    num_rest = rest_ids[-1] + 1 if rest_ids else 0
    present = set(rest_ids)
    # every property of the degree-0 layout but the normals (3DGS writes zeros there and never reads them)
    missing = [k for k in gaussian_ply_properties(0) if k not in table and k not in _NORMALS]
    missing += [f"f_rest_{i}" for i in range(num_rest) if i not in present]  # gaps: f_rest must be 0..n-1
    if missing:
        raise DataError(f"{source}: not a 3DGS PLY, missing vertex properties: {', '.join(missing)}")
    bases = num_rest // 3 + 1  # K = (d + 1)^2 SH bases per channel
    degree = math.isqrt(bases) - 1
    if num_rest % 3 or num_sh_bases(degree) != bases:
        raise DataError(f"{source}: {num_rest} f_rest_* properties match no SH degree "
                        "(expected 3 * ((d + 1)^2 - 1): 0, 9, 24, 45, ...)")
    return degree


def read_gaussian_ply(path: str | Path) -> tuple[dict[str, np.ndarray], int]:
    """Read a standard 3DGS PLY (gsplat, Inria 3DGS, nerfstudio exports) as the field's raw parameters.

    Values are taken as stored (3DGS writes them pre-activation): opacity logits, log scales, wxyz quaternions
    (not normalised: the rasterizer normalises them), and ``f_rest`` channel-major, i.e. property
    ``f_rest_{c·(K-1) + j}`` is band ``j + 1`` of channel ``c``.

    Args:
        path: the ``.ply`` file.

    Returns:
        ``({"means": [G, 3], "scales": [G, 3], "quats": [G, 4], "opacities": [G], "sh0": [G, 1, 3],
        "shN": [G, K-1, 3]}, sh_degree)``, float32 arrays (``shN`` is ``[G, 0, 3]`` at degree 0).

    Raises:
        DataError: unreadable, not a 3DGS PLY (:func:`validate_gaussian_ply`), no vertices, or non-finite values.
    """
    table = read_ply(path)
    degree = validate_gaussian_ply(table, path)
    n = len(table["x"])
    if n == 0:
        raise DataError(f"{path}: the PLY holds no Gaussians")

    def cols(names: list[str]) -> np.ndarray:
        return np.stack([np.asarray(table[k], dtype=np.float32) for k in names], 1)  # [G, len(names)]

    rest = 3 * (num_sh_bases(degree) - 1)
    # channel-major [G, 3, K-1] on disk -> the field's [G, K-1, 3]
    sh_rest = (cols([f"f_rest_{i}" for i in range(rest)]).reshape(n, 3, -1).transpose(0, 2, 1).copy() if rest
               else np.zeros((n, 0, 3), dtype=np.float32))
    gaussians = {
        "means": cols(["x", "y", "z"]),
        "scales": cols([f"scale_{i}" for i in range(3)]),
        "quats": cols([f"rot_{i}" for i in range(4)]),  # w first
        "opacities": cols(["opacity"])[:, 0],
        "sh0": cols([f"f_dc_{i}" for i in range(3)])[:, None, :],  # [G, 1, 3]
        "shN": sh_rest,  # [G, K-1, 3]
    }
    bad = np.zeros(n, dtype=bool)  # [G]
    for value in gaussians.values():
        bad |= ~np.isfinite(value.reshape(n, -1)).all(1)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} of {n} Gaussians have non-finite (NaN/inf) values")
    return gaussians, degree
