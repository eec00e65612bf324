"""What training saves (last.pt, best.pt) and how it comes back, without training."""

import torch

from tinyt.checkpoint import (restore_training, saved_rng_state, training_payload,
                              weights_payload)
from tinyt.config import TrainConfig, config_from_dict
from tinyt.distributed import World
from tinyt.schedule import LearningRateSchedule


class Pieces:
    """A model, optimizer, schedule and scaler as a trainer holds them."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(3, 2)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.schedule = LearningRateSchedule(self.optimizer, TrainConfig(lr=0.01, warmup_steps=4))
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)

    def as_kwargs(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule,
                "scaler": self.scaler}


def payload_of(pieces: Pieces, tiny_config_dict, rng_ranks) -> dict:
    return training_payload(**pieces.as_kwargs(), progress={"step": 3}, rng_ranks=rng_ranks,
                            tokenizers_fingerprint="fp", config=config_from_dict(tiny_config_dict))


def test_last_pt_keeps_its_keys_and_best_pt_its_subset(tiny_config_dict):
    # Checkpoints written before and after must resume alike: these names are the format.
    single = payload_of(Pieces(0), tiny_config_dict, [{"torch": 1}])
    assert list(single) == ["model", "optimizer", "scheduler", "scaler", "progress", "rng",
                            "tokenizer_fingerprint", "config"]
    several = payload_of(Pieces(0), tiny_config_dict, [{"torch": 1}, {"torch": 2}])
    assert several["rng"] == {"torch": 1} and several["rng_ranks"] == [{"torch": 1}, {"torch": 2}]
    assert list(weights_payload(single)) == ["model", "progress", "tokenizer_fingerprint",
                                             "config"]


def test_restore_brings_back_every_piece(tiny_config_dict, tmp_path):
    saved = Pieces(0)
    saved.schedule.start_update(2)
    saved.schedule.validated(2, 1.0)
    payload = payload_of(saved, tiny_config_dict, [{}])
    fresh = Pieces(1)
    progress = restore_training(payload, tmp_path / "last.pt", **fresh.as_kwargs(),
                                tokenizers_fingerprint="fp")
    assert progress == {"step": 3}
    for a, b in zip(saved.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
    assert fresh.schedule.lr == saved.schedule.lr == 0.005
    assert fresh.schedule.state_dict() == saved.schedule.state_dict()


def test_each_rank_continues_its_own_random_stream_when_it_can():
    ranks = {"rng": "r0", "rng_ranks": ["r0", "r1"]}
    assert saved_rng_state(ranks, World(1, 2, launched=True)) == "r1"
    # Saved by another number of processes: rank 0 continues the saved stream, others start anew.
    assert saved_rng_state(ranks, World(0, 3, launched=True)) == "r0"
    assert saved_rng_state(ranks, World(2, 3, launched=True)) is None
    assert saved_rng_state({"rng": "r0"}, World()) == "r0"
