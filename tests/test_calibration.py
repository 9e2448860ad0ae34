import pytest
import torch

from compress.calibration.data import CalibrationError, calibration_batches, sample_windows, token_hash
from compress.config import CalibConfig


def test_windows_are_seeded_slices_of_the_token_stream():
    ids = torch.arange(1000).reshape(1, -1)
    a = sample_windows(ids, 16, 32, seed=0)
    assert a.shape == (16, 32)
    assert torch.equal(a, sample_windows(ids, 16, 32, seed=0))
    assert not torch.equal(a, sample_windows(ids, 16, 32, seed=1))
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(16, 32))  # contiguous windows
    assert int(a.max()) < 1000


def test_manifest_records_source_and_token_hash(tokenizer, calib_txt):
    tokens, manifest = calibration_batches(tokenizer, CalibConfig(str(calib_txt), 8, 64, seed=3))
    assert tokens.shape == (8, 64)
    assert manifest.token_sha256 == token_hash(tokens)
    assert (manifest.source, manifest.nsamples, manifest.seqlen, manifest.seed) == (str(calib_txt), 8, 64, 3)
    assert manifest.text_tokens > 8 * 64


def test_too_short_text_names_the_numbers(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here " * 10)
    with pytest.raises(CalibrationError, match=r"fewer than --nsamples 128 x --seqlen 2048"):
        calibration_batches(tokenizer, CalibConfig(str(short), 128, 2048))


def test_missing_source_names_the_choices():
    from compress.calibration.data import read_text

    with pytest.raises(CalibrationError, match=r"neither a file nor one of \['wikitext2'\]"):
        read_text("no-such-file.txt")
