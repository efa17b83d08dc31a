"""patchwidgets.rounded: what the course prints must print the same on every machine."""

import numpy as np
import pandas as pd
import torch

from patchwidgets import rounded


def test_negative_zero_and_noise_print_as_zero():
    frame = pd.DataFrame({"name": ["a", "b"], "value": [-3e-8, 0.12499]})
    assert rounded(frame).to_string() == pd.DataFrame({"name": ["a", "b"], "value": [0.0, 0.12]}).to_string()
    assert "-0" not in str(rounded(torch.tensor([-1e-9, 0.5])))
    assert str(rounded(-0.001)) == "0.0"
    assert str(rounded(np.array([-0.004]))) == "[0.]"


def test_float32_columns_print_their_rounded_value():
    frame = pd.DataFrame({"rank": np.array([81.12345, 1.0], dtype=np.float32)})
    assert "81.12" in rounded(frame).to_string() and "81.120003" not in rounded(frame).to_string()


def test_containers_and_non_numbers():
    assert rounded({"a": [0.123, -0.0001]}) == {"a": [0.12, 0.0]}
    assert rounded("text") == "text"
    assert rounded(pd.Series(["x"])).tolist() == ["x"]
