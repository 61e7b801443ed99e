"""One cross-modal run: paired data, two towers, the shared training loop, retrieval in both directions.

Test metrics: image-to-text and text-to-image Recall@{1,5,10}, median rank and label-level MAP@R
(``experiments.eval.crossmodal``), plus ``precision_at_1``, ``r_precision`` and ``map_at_r`` of
image queries against the text gallery by label, so sweeps and analysis compare cross-modal losses
with the same columns as the others. The embeddings artifact holds the image embeddings as
``embeddings`` and the text embeddings as ``ref_embeddings``.
"""
from __future__ import annotations

from experiments.data.paired import (PairedObjective, build_two_tower, embed_pairs, load_paired, paired_device_data,
                                    validate_pairs)
from experiments.eval.crossmodal import cross_modal_metrics
from experiments.eval.retrieval import retrieval_metrics
from experiments.data.captions import Vocabulary
from experiments.data.sampler import PKSampler
from experiments.train.loop import pick_device, train
from losses import build_loss, loss_info


def check_image_tower_options(cfg) -> None:
    """The image tower is the small CNN or ResNet: refuse the backbone-only options, never ignore them."""
    unsupported = [key for key, value in (("model.weights", cfg.model.weights), ("model.freeze_bn", cfg.model.freeze_bn),
                                          ("dataset.crop_size", cfg.dataset.crop_size)) if value]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} are not supported for the paired dataset {cfg.dataset.name!r} "
                         "(its image tower is the small CNN or ResNet): remove them")


def train_and_evaluate_paired(cfg, run, on_epoch, evaluate_test: bool, log_embeddings: bool):
    """Train on a paired dataset and evaluate retrieval in both directions; one MLflow run."""
    from experiments.train.run import finish_run, log_run_config

    check_image_tower_options(cfg)
    device = pick_device(cfg.device)
    run.set_tags({"tripletlab.device": str(device), "tripletlab.task": "cross-modal"})
    splits = load_paired(cfg.dataset, cfg.seed)
    vocabulary = Vocabulary(splits.train.captions)
    sampler = PKSampler(splits.train.labels, cfg.batch.p, cfg.batch.k, cfg.seed)
    log_run_config(run, cfg, splits.info, int(splits.train.labels.max()) + 1, sampler)
    run.log_params({"data.vocabulary_size": len(vocabulary)})
    model = build_two_tower(cfg, splits.train, vocabulary).to(device)
    objective = PairedObjective(build_loss(cfg.loss.name, **cfg.loss.params),
                                loss_info(cfg.loss.name).cross_modal).to(device)
    train_data, val_data, test_data = paired_device_data(splits, vocabulary, device, cfg.dataset.augment, cfg.seed)
    outcome = train(model, objective, train_data, sampler, val_data if len(val_data) > 1 else None, cfg, device,
                    on_epoch=on_epoch, log_epoch=lambda epoch, metrics: run.log_metrics(metrics, step=epoch),
                    validate=validate_pairs)
    if not evaluate_test:
        return finish_run(run, cfg, outcome, None, None)
    image, text, labels = embed_pairs(model, test_data, cfg.eval.batch_size)
    test = cross_modal_metrics(image, text, labels)
    by_label = retrieval_metrics(image, labels, text, labels, with_nmi=False)
    test.update({k: by_label[k] for k in ("precision_at_1", "r_precision", "map_at_r")})
    npz = None
    if log_embeddings and cfg.tracking.log_embeddings:
        npz = {"embeddings": image.cpu().numpy(), "labels": labels.cpu().numpy(),
               "ref_embeddings": text.cpu().numpy(), "ref_labels": labels.cpu().numpy()}
    return finish_run(run, cfg, outcome, test, npz)
