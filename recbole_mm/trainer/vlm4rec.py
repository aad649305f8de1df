"""VLM4Rec's trainer: evaluation only for the parameter-free variants, InfoNCE training for the learned fusions."""

from __future__ import annotations

import os

from recbole.trainer import Trainer


class VLM4RecTrainer(Trainer):
    """RecBole's trainer for :class:`~recbole_mm.model.vlm4rec.VLM4Rec`.

    The item vectors come with the model's dataset (built, or read from their caches, when the
    dataset is created: :class:`~recbole_mm.data.dataset.MultimodalSequentialDataset`). A
    variant without parameters (text, image, concat, average) is not trained: ``fit`` evaluates it
    once on the validation data, and no checkpoint is written. The learned fusions (attention,
    gating) train as any RecBole model (``epochs``, ``learning_rate``, early stopping on
    ``valid_metric``, best checkpoint reloaded for the test). ``extra_results`` adds the build
    statistics (items per second of each encoder, cache use) and the scoring cost per user.
    """

    def _build_optimizer(self, **kwargs):
        if not any(p.requires_grad for p in self.model.parameters()):
            return None
        return super()._build_optimizer(**kwargs)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        if self.model.trainable:
            return super().fit(train_data, valid_data, verbose=verbose, saved=saved,
                               show_progress=show_progress, callback_fn=callback_fn)
        self.saved_model_file = None  # nothing is trained, so there is nothing to save
        self.eval_collector.data_collect(train_data)
        if valid_data:
            self.best_valid_score, self.best_valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
            if verbose:
                self.logger.info(f"[VLM4Rec] no training for fusion {self.model.fusion_kind!r}; "
                                 f"valid: {dict(self.best_valid_result)}")
        return self.best_valid_score, self.best_valid_result

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if model_file is None and (not self.saved_model_file or not os.path.isfile(self.saved_model_file)):
            load_best_model = False
        return super().evaluate(eval_data, load_best_model=load_best_model, model_file=model_file,
                                show_progress=show_progress)

    def extra_results(self) -> dict:
        scoring = dict(self.model.scoring)
        users = scoring["users"]
        scoring["ms_per_user"] = 1000 * scoring["seconds"] / users if users else None
        return {"vlm4rec": {**self.model.build_info, "fusion": self.model.fusion_kind,
                            "history_length": self.model.history_length, "scoring": scoring,
                            "learned_fusion": self.model.fusion_summary()}}
