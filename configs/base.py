"""Every config field of jaxsae, with defaults for a real-activation run (Gao et al. 2024 recipe).

Not meant to be run as is (it needs data.path); the configs beside it import it and change fields:

  python -m jaxsae.main --config=configs/base.py --workdir=/tmp/sae \
      --config.data.source=npy --config.data.path=acts.npy --config.sae.d=576
"""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()

  c.sae = ml_collections.ConfigDict()
  c.sae.d = 768                  # input width; must equal the data's last dimension
  c.sae.n = 32768                # number of latents (dictionary size)
  c.sae.k = 32                   # active latents per token
  c.sae.k_aux = -1               # AuxK latents; -1: the power of two nearest d/2
  c.sae.auxk_coef = 1 / 32       # alpha of the AuxK loss; 0 disables AuxK
  c.sae.dead_tokens = 10_000_000  # a latent is dead after this many tokens without firing
  c.sae.auxk_relu = False        # AuxK values without the paper's ReLU: dead latents whose
                                 # pre-activations are all negative still train (4-10x fewer stay
                                 # dead, same FVU: bench/history.md); True: the paper's AuxK
  c.sae.auxk_norm = "input"      # AuxK's squared error over the variance of the "input" (as
                                 # sparsify) or of the "residual" it rebuilds (OpenAI's train.py:
                                 # 1/FVU times stronger; model.aux_term)
  c.sae.multi_topk = False       # add L(4k)/8 to the loss (Multi-TopK)
  c.sae.architecture = "topk"    # "topk": k latents per row; "batchtopk": the B*k largest of the
                                 # global batch, a JumpReLU at inference; "matryoshka_batchtopk":
                                 # that, trained as nested dictionaries (model.py)
  c.sae.batchtopk_cap = 4        # batchtopk: at most this many x k latents per row (rows that
                                 # reach it are counted: sparsity/rows_at_cap)
  c.sae.matryoshka_prefixes = (1 / 16, 1 / 4)  # "matryoshka_batchtopk": the nested dictionaries
                                 # below n, as fractions of n (increasing, each < 1)
  c.sae.d_out = 0                # transcoders (data.target_path set): the target's width; 0: d
  c.sae.skip = False             # transcoders: add a linear term x W_skip^T [d_out, d_in] (skip
                                 # transcoders, Paulo et al. 2025), zero at init
  c.sae.encoder_init_norm = 0.3  # encoder rows at init: the decoder's unit rows times this. 0.3,
                                 # not the paper's 1: lower or equal FVU on SmolLM2 at every LR
                                 # tried, far fewer dead latents on synthetic data; 0.1 is best at
                                 # high LRs, worse at low ones (bench/history.md)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 10_000
  c.train.batch_size = 4096      # tokens per step, global across all devices
  c.train.lr = config_dict.placeholder(float)  # peak rate; None: from d, n, batch and steps, see
                                               # optim.LR_REFERENCE (logged, in config.json)
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 6.25e-10
  c.train.opt_state_dtype = "float32"  # Adam moments: "float32" | "bfloat16" (stochastically
                                       # rounded; halves the optimizer state, optim.py)
  c.train.lazy_optimizer = config_dict.placeholder(bool)  # Adam on the selected latents' rows
                                  # only (top-k + AuxK picks): the others keep params and moments
                                  # (no decay, no momentum step), like TF's LazyAdam; needs
                                  # opt_state_dtype="float32". None: lazy where every latent is
                                  # selected about once a step or more (batch x k >= n), where it
                                  # stops latents coasting out of the top-k on momentum
                                  # (optim.resolve_lazy; logged, in config.json)
  # Chosen by the system (None: automatic, logged at start-up with why, in config.json's
  # `resolved`; knobs.py). They change only speed or memory, never the result; set one to override.
  c.train.dense_op_ratio = config_dict.placeholder(int)  # xla path: sparse ops over K latents run
                                 # as dense GEMMs when n_local <= ratio * K (AuxK on small
                                 # dictionaries); 0: never. Automatic: 16 (knobs.dense_op_ratio)
  c.train.auxk_buckets = config_dict.placeholder(bool)  # run AuxK only as wide as the dead latents
                                 # need (same result). Automatic: on
  c.train.auxk_compact = config_dict.placeholder(bool)  # AuxK over a list of the dead latents when
                                 # few are dead (at most ~n/8 per shard): its top-k and sparse ops
                                 # over the list's rows, not all n (same update; 1.9x faster AuxK
                                 # steps on CPU, docs/training.md). Automatic: on
  c.train.warmup_steps = 0       # linear warmup steps; -1: 5% of the run, at most 1000 (on the
                                 # fixture at lr 1.2e-2 it cost 2% held-out FVU: bench/history.md)
  c.train.b_pre_lr_ratio = -1.0  # b_pre's learning rate / the weights'; -1: 1 / (encoder_init_norm
                                 # x sqrt(d)), which keeps b_pre's nearly noise-free drift from
                                 # pushing latents below the top-k (optim.resolve_b_pre_ratio)
  c.train.decoder_lr_ratio = 1.5 # W_dec's learning rate / the weights'; its best measured 1.3-2x
                                 # over k 16-128 (optim.lr_ratios; bench/history.md)
  c.train.decay_frac = 1.0       # linear decay to 0 over this final fraction of steps (1.0: from
                                 # the end of warmup to the last step, as sparsify)
  c.train.seed = 0
  c.train.log_every = 50
  c.train.eval_every = 0         # 0: evaluate only at the end
  c.train.on_nonfinite = "stop"  # NaN/inf in a batch: "stop" the run or "skip" the batch
  c.train.init_rows = 32768      # rows sampled for the input scale and the geometric median
  c.train.median_iters = 64      # Weiszfeld iterations for the b_pre geometric median

  c.data = ml_collections.ConfigDict()
  c.data.source = "npy"          # "synthetic" | "npy" | "store"
  c.data.path = ""               # .npy file or activation store
  c.data.target_path = ""        # a second store with the same rows (another hook of the same
                                 # dump, e.g. jaxsae.dump --hooks=mlp_in,mlp_out): train a
                                 # transcoder from data.path's rows to these; "": an autoencoder
  c.data.normalize = "d"         # inputs scaled to mean squared norm: "d" | "unit" | "none"
  c.data.normalize_about = "mean"  # that norm measured about the data's "mean" (offset-blind:
                                   # b_pre takes the offset) or about "zero"
  c.data.eval_rows = 16384       # held-out rows for eval/* (0: no eval)
  c.data.eval_batches = 4
  c.data.shuffle_seed = 0
  # Activation stores (data.source="store"; made by `python -m jaxsae.dump`). The eval split is
  # data.eval_rows rounded up to whole chunks, spread evenly over the store.
  c.data.dtype = ""              # required store dtype: "float32" | "bfloat16" | "float16"; "" any
  c.data.epochs = 0              # passes over the training chunks; 0: repeat forever
  c.data.shuffle_buffer_chunks = 8  # chunks whose rows are mixed in memory before batching
  c.data.num_threads = 2         # grain reader threads
  c.data.prefetch = 2            # chunk groups read ahead; memory ~ (2 prefetch + threads) groups
  # Chosen by the system unless set (knobs.py; logged, in config.json's `resolved`):
  c.data.retain_freed_memory = config_dict.placeholder(bool)  # glibc keeps freed buffers for reuse
                                 # (loader ~1.5x faster). Automatic: on for a store under glibc
  c.data.direct_read = config_dict.placeholder(bool)  # local uncompressed stores: pread + crc32c,
                                 # not TensorStore. Automatic: on for a local store
  c.data.allow_incomplete = False  # read a store whose dump has not finished
  c.data.missing_hint = ""       # printed when data.path holds no store: the command that makes it
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_features = 1024  # ground-truth features
  c.data.synthetic.active = 8.0         # mean active features per sample
  c.data.synthetic.freq_exponent = 0.5  # feature frequency ~ rank^-exponent (uneven)
  c.data.synthetic.noise = 0.01         # Gaussian noise std, relative to unit features
  c.data.synthetic.seed = 1234

  c.metrics = ml_collections.ConfigDict()
  c.metrics.wandb_project = ""   # also log the scalars to this Weights & Biases project ("" off;
                                 # pip install -e ".[wandb]"; WANDB_MODE=offline: no network)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000  # also saved at the end and on SIGTERM; 0: only those
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True   # write in the background; the loop waits only for the copy
                                   # off the devices

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)         # one size per axis; -1 takes the remaining devices
  c.mesh.axes = ("data", "model")
  c.mesh.batch_axes = ("data",)  # mesh axes the batch is split over
  c.mesh.latent_axis = "model"   # mesh axis the n latents are split over
  c.mesh.dcn_shape = ()          # multi-slice: per-axis sizes *across* slices (mesh.shape is then
                                 # within a slice), e.g. axes ("slice", "data", "model"),
                                 # dcn_shape (4, 1, 1), batch_axes ("slice", "data"); () for none
  c.mesh.device_memory = ""      # per-device memory for the start-up fit check (plan.py), e.g.
                                 # "80GiB"; "" asks the device (CPU: host RAM / local devices);
                                 # "off" skips the check

  c.sweep = ()                   # several SAEs in one job on one read of the data: a list of
                                 # override dicts, one member each, e.g. [{"train.lr": 2e-3},
                                 # {"sae.k": 16}] or sweep.grid({...}); members train in
                                 # WORKDIR/members/<name> (jaxsae/sweep.py)
  c.sweep_stacking = "auto"      # members that differ only in lr and seed: "vmap" (stacked
                                 # states, one batched step), "loop" (their steps in one program)
                                 # or "separate" (a step each); auto: separate on CPU, vmap on
                                 # GPU/TPU (sweep.resolve_stacking, logged)

  c.kernels = "auto"             # "auto" | "xla" | "pallas"; auto: pallas on GPU, xla on TPU and
                                 # CPU (config_check.resolve_kernels says why; logged at start-up)
  c.compute_dtype = "float32"    # dtype of the encoder GEMM: "float32" | "bfloat16"
  c.encoder_tile = config_dict.placeholder(int)  # >0: compute pre[B, n] in tiles of this many
                                 # latents with a running top-k (memory O(B x tile), same picks,
                                 # topk.py); 0: in one piece. Automatic (plan.resolve_encoder_tile):
                                 # 0 where the un-tiled step fits the device memory, else the
                                 # largest power-of-two tile that fits (logged, in config.json)
  return c
