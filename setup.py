"""Build hook for the optional native parts; all metadata lives in pyproject.toml.

The block hasher links the system's libxxhash (Debian/Ubuntu: libxxhash0); the prefix matcher,
the index's compact block map and the latency predictor need only Python's headers. If one cannot
be built, installation still succeeds and kvgate uses the pure-Python code (same results, slower
or larger).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvgate.tokens._blockhash",
            sources=["src/kvgate/tokens/_blockhash.c"],
            extra_compile_args=["-O3"],
            extra_link_args=["-l:libxxhash.so.0"],
            optional=True,
        ),
        Extension(
            "kvgate.index._leading",
            sources=["src/kvgate/index/_leading.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "kvgate.index._blockmap",
            sources=["src/kvgate/index/_blockmap.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "kvgate.scheduling._latency",
            sources=["src/kvgate/scheduling/_latency.c"],
            # No fused multiply-add: each product must round on its own, as it does in Python.
            extra_compile_args=["-O3", "-ffp-contract=off"],
            optional=True,
        ),
    ]
)
