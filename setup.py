"""Build hook for the optional native block hasher; all metadata lives in pyproject.toml.

The extension links the system's libxxhash (Debian/Ubuntu: libxxhash0). If it cannot be built,
installation still succeeds and kvgate uses its pure-Python hashing (same results, slower).
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
        )
    ]
)
