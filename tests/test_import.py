"""`import hf_polyattn` needs no cryptography: TenSEAL loads when encryption is first asked for."""

import subprocess
import sys
import textwrap


def test_the_package_imports_and_generates_without_tenseal():
    script = textwrap.dedent("""
        import sys
        sys.modules["tenseal"] = None  # as if not installed: importing it raises ImportError
        sys.modules["websockets"] = None
        import torch
        import hf_polyattn
        from tests.helpers import tiny_model
        model = tiny_model()
        ids = torch.tensor([[1, 2, 3]])
        assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)
        try:
            model.generate(ids, secure=True, max_new_tokens=1)
        except ImportError as error:
            assert "CKKS dependencies (tenseal, websockets)" in str(error), error
        else:
            raise AssertionError("secure generation ran without TenSEAL")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
