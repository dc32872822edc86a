"""The one build setting pyproject.toml cannot state stably yet: the optional C kernel.

Everything else (metadata, dependencies, packages) is in pyproject.toml. ``optional=True``:
without a working C compiler the install still succeeds, and ivfpq-store searches with numpy
(docs/design.md, "Scan kernel").
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "ivfpq_store._scan",
    sources=["ivfpq_store/_scan.c"],
    # -ffp-contract=fast: fused multiply-adds (-std=c99 alone turns them off); 5-9% faster.
    extra_compile_args=["-O3", "-std=c99", "-ffp-contract=fast", "-fno-strict-aliasing"],
    extra_link_args=["-pthread"],
    optional=True,
)])
