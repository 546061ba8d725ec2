"""Build hook for the optional native parts; all metadata lives in pyproject.toml.

The block hasher links the system's libxxhash (Debian/Ubuntu: libxxhash0); the prefix matcher and
the index's compact block map need only Python's headers. If one cannot be built, installation
still succeeds and kvgate uses the pure-Python code (same results, slower or larger).
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
    ]
)
