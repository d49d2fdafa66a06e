"""Pieces shared by the training configs: the original recipe's defaults, grouped.

Each config file calls these and then changes what differs. Keys listed in
design.md ("Config keys every training config has") are always present.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """The original SignCLIP baseline_temporal recipe (reference sections 1, 4, 6)."""
    c = ml_collections.ConfigDict()
    c.seed = 1  # fairseq's default seed
    c.batch_size = 448  # global: all devices, all hosts
    c.num_epochs = 25
    c.total_steps = 0  # > 0 overrides num_epochs
    c.microbatches = (
        1  # > 1: contrastive-correct accumulation (embed all, one loss, backprop per micro-batch)
    )
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.init_from = ""  # a checkpoint step dir or workdir to start from (fine-tuning)
    c.max_bad_steps = 100  # NaN/inf steps are skipped; more than this many fails the run
    # Persistent XLA compilation cache ("" = off; gs:// works). One train step of the original
    # recipe took ~100 s to compile on an H100 (BENCHMARKS.md), and every padded length
    # (data.length_buckets) is its own program: a restart or a second run reads them back.
    c.compilation_cache_dir = "~/.cache/signclip_jax/jax_cache"

    c.model = ml_collections.ConfigDict()
    c.model.text_model = "bert-base-cased"  # HF folder or hub name (tokenizer and weights)
    c.model.video_layers = 12
    c.model.projection = "none"  # none | linear | linear_l2
    c.model.pose_dim = 609
    c.model.dtype = "float32"  # compute dtype; parameters are always float32
    c.model.remat = False
    c.model.attention = "xla"  # xla | cudnn | auto (jax.nn.dot_product_attention implementation)
    c.model.pretrained = True  # initialise both towers from text_model's weights

    c.data = ml_collections.ConfigDict()
    c.data.source = "spreadthesign"
    c.data.csv_path = ""  # SperadTheSign.csv [sic]: pose, videoLanguage, language, text
    c.data.pose_dir = ""
    c.data.split_dir = ""  # {train,val,test}.txt row ids (1.0.0-uzh); empty -> generated split
    c.data.split_seed = 3407
    c.data.val_fraction = 0.001
    c.data.test_fraction = 0.001
    c.data.languages = ("en",)
    c.data.manifest = ""
    c.data.tfds_name = ""
    c.data.data_dir = ""
    c.data.shards = ""
    c.data.max_frames = 256
    c.data.pose_components = "reduced_face"
    c.data.include_z = True
    c.data.prompt_template = "spreadthesign"
    c.data.text_max_len = 64
    c.data.length_buckets = ()  # e.g. (64, 128, 256); empty -> always pad to max_frames
    # K > 1: training sorts each window of K batches by clip length before cutting batches, so
    # the buckets pad less (without it the longest of 448 clips is nearly always > 192 frames).
    # Batches then hold clips of similar length (their negatives too). 0 = off, as the original.
    c.data.length_group_batches = 0
    # Host dtype of the poses. auto: model.dtype when it is 16-bit (the same embeddings bit for
    # bit, half the bytes to move and hold), else float32.
    c.data.pose_dtype = "auto"
    c.data.workers = 4
    c.data.max_bad_fraction = 0.01
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.temporal = True
    c.data.augment.temporal_std = 0.2
    c.data.augment.spatial = False
    c.data.augment.spatial_std = 0.2
    c.data.augment.noise = False
    c.data.augment.noise_std = 0.001
    c.data.augment.flip_prob = 0.0
    c.data.augment.frame_dropout_rate = 0.0

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "signclip"  # signclip | clip | siglip

    # fairseq Adam + polynomial_decay (power 1, end 0) as the original; see train.py.
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 5e-5
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_steps = 1000
    c.optimizer.decay_steps = 1_000_000  # fairseq total_num_update
    c.optimizer.end_lr = 0.0
    c.optimizer.clip_norm = 2.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1)  # -1: all remaining devices
    c.mesh.axes = ("data", "fsdp")
    return c
