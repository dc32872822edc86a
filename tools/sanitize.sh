#!/usr/bin/env bash
# The C kernel under AddressSanitizer and UBSan: builds it in a copy of this checkout (the
# tree's own build is left alone) and runs the given tests there, the kernel's by default.
#
#   bash tools/sanitize.sh                                  # kernel, fast scan, search tests
#   bash tools/sanitize.sh tests/test_fastscan.py -k ties   # any pytest arguments
#
# Any error report (an out-of-bounds read, undefined behaviour) stops the run with a
# non-zero status. Leak detection is off: CPython's own allocations are not ours.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/ivfpq-sanitize-XXXXXX)
trap 'rm -rf "$work"' EXIT
git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 cp -P --parents -t "$work")
cd "$work"
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
CFLAGS="$flags" LDFLAGS="$flags" IVFPQ_STORE_REQUIRE_KERNEL=1 \
    python setup.py build_ext --inplace -q
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
[ $# -gt 0 ] || set -- tests/test_fastscan.py tests/test_kernel.py tests/test_search.py
# the copy's sanitized kernel, not an installed one, is what the tests will load
LD_PRELOAD="$asan:$ubsan" ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$work" python -c "
import ivfpq_store._scan as k, sys
assert k.__file__.startswith('$work'), k.__file__
print('kernel:', k.__file__)"
nm -D ivfpq_store/_scan*.so | grep -q __asan_init || { echo "not sanitized" >&2; exit 1; }
LD_PRELOAD="$asan:$ubsan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 IVFPQ_STORE_REQUIRE_KERNEL=1 \
    PYTHONPATH="$work" python -m pytest -q -p no:cacheprovider "$@"
