"""One fuzz target under atheris (libFuzzer): `python tests/fuzz/run.py TARGET [libFuzzer options]
[corpus dirs]`. tools/fuzz.py is the front end (corpus, sanitizer build, time limits, statistics).
pyxf's and gguf's Python code is instrumented for coverage; the C++ core is not (gcc has no
libFuzzer instrumentation), but runs under AddressSanitizer when tools/fuzz.py preloads it."""

import os
import sys

import atheris

if os.environ.get("PYXF_IMPORT_ROOT"):  # the sanitized build's package (tools/sanitize.sh)
    sys.path.insert(0, os.environ["PYXF_IMPORT_ROOT"])

with atheris.instrument_imports(include=["pyxf", "gguf"]):
    import gguf  # noqa: F401
    import pyxf  # noqa: F401
    import pyxf.convert  # noqa: F401
    import pyxf.convert.gguf_import  # noqa: F401
    import pyxf.convert.hf  # noqa: F401
    import pyxf.model  # noqa: F401
    import pyxf.seq2seq  # noqa: F401
    import pyxf.tensorfile  # noqa: F401
    import pyxf.text  # noqa: F401
    import pyxf.tokenizer  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import targets  # noqa: E402


def main():
    name = sys.argv.pop(1)
    print(f"pyxf fuzz target {name}: pyxf from {os.path.dirname(pyxf.__file__)}", file=sys.stderr)
    atheris.Setup(sys.argv, targets.TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
