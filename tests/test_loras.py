"""LoRA names resolve only to .safetensors files inside the LoRA folders (no model is loaded here)."""

from __future__ import annotations

import pytest

from Wan2GP.loras import LoraRefused, replace_lora_urls, resolve_lora, validate_loras

URL = "https://huggingface.co/org/repo/resolve/main/high_noise.safetensors"


@pytest.fixture
def folders(tmp_path):
    loras = tmp_path / "loras"
    (loras / "wan").mkdir(parents=True)
    (loras / "style.safetensors").write_bytes(b"x")
    (loras / "wan" / "motion.safetensors").write_bytes(b"x")
    (loras / "old.pt").write_bytes(b"x")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    (loras / "link.safetensors").symlink_to(outside)
    (loras / "inside-link.safetensors").symlink_to(loras / "style.safetensors")
    return loras, outside


def test_names_resolve_inside_the_folders(folders):
    loras, _ = folders
    assert resolve_lora("style", [loras]).path == (loras / "style.safetensors").resolve()
    assert resolve_lora("style.safetensors", [loras]).name == "style.safetensors"
    assert resolve_lora("wan/motion", [loras]).name == "wan/motion.safetensors"  # subfolders are fine
    assert resolve_lora("inside-link", [loras]).path == (loras / "style.safetensors").resolve()


def test_paths_and_links_out_of_the_folders_are_refused_without_telling_what_exists(folders):
    loras, outside = folders
    for name in (str(outside), str(loras / "style.safetensors"), "../secret", "wan/../../secret", "~/x"):
        with pytest.raises(LoraRefused, match="absolute paths, '~' and '..' are refused"):
            resolve_lora(name, [loras])
    # a link leading out of the folder reads exactly like a missing file
    with pytest.raises(LoraRefused) as linked:
        resolve_lora("link", [loras])
    with pytest.raises(LoraRefused) as missing:
        resolve_lora("nothing-here", [loras])
    assert str(linked.value) == "LoRA 'link' is not in the LoRA folders"
    assert str(missing.value) == "LoRA 'nothing-here' is not in the LoRA folders"
    assert str(loras) not in str(missing.value)
    with pytest.raises(LoraRefused, match="only .safetensors files are loaded"):
        resolve_lora("old.pt", [loras])
    with pytest.raises(LoraRefused, match="is a URL"):
        resolve_lora(URL, [loras])


def test_validate_at_post_names_the_field_and_returns_urls(folders):
    loras, outside = folders
    params = {
        "activated_loras": "style, wan/motion",
        "additional_loras": {URL: 0.5},
        "phase_config": {"phases": [{"loras": [{"url": URL, "multiplier": "1.0"}]}, {"loras": []}]},
    }
    assert validate_loras(params, [loras]) == [URL, URL]
    assert validate_loras(params) == [URL, URL]  # syntax only
    with pytest.raises(LoraRefused, match=r"^lora_names: LoRA '.*secret.safetensors': LoRAs are named"):
        validate_loras({"lora_names": [str(outside)]})
    with pytest.raises(LoraRefused, match=r"^phase_config.phases.1.loras: LoRA '../x'"):
        validate_loras({"phase_config": {"phases": [{"loras": []}, {"loras": [{"url": "../x"}]}]}})
    with pytest.raises(LoraRefused, match=r"^additional_loras: LoRA 'nope' is not in the LoRA folders"):
        validate_loras({"additional_loras": {"nope": 1.0}}, [loras])


def test_fetched_urls_become_names_in_the_cache_folder():
    params = {
        "lora_names": [URL, "style"],
        "additional_loras": {URL: 0.5},
        "phase_config": {"phases": [{"loras": [{"url": URL, "multiplier": "1.0"}]}]},
        "loras": [{"path": URL, "scale": 0.8}, {"path": "style"}],
    }
    swapped = replace_lora_urls(params, {URL: "ab12.safetensors"})
    assert swapped["loras"] == [{"path": "ab12.safetensors", "scale": 0.8}, {"path": "style"}]
    assert swapped["lora_names"] == ["ab12.safetensors", "style"]
    assert swapped["additional_loras"] == {"ab12.safetensors": 0.5}
    assert swapped["phase_config"]["phases"][0]["loras"][0] == {
        "url": "ab12.safetensors",
        "multiplier": "1.0",
    }
    assert params["lora_names"][0] == URL  # the input is left as it was
