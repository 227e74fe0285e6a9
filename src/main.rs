//! spdlab command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

mod print;

// Tensor work allocates and frees many large buffers per step; glibc's malloc returns them to
// the kernel each time (mmap/munmap, page faults). mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use spdlab::io::output::Replace;
use spdlab::io::spdlab_file::{self, FileExtras};
use spdlab::presets;
use spdlab::runner::{self, RunOptions, TrainSummary};
use spdlab::spd::trainer::Trainer;

#[derive(Parser)]
#[command(
    name = "spdlab",
    version,
    about = "Stochastic Parameter Decomposition lab (no command: open the desktop app)"
)]
struct Cli {
    /// Open this file (.spdlab or a goodfire-ai/spd run) in the app.
    file: Option<PathBuf>,
    /// Log the app's own CPU time per frame (p50/p99) every 5 s and at exit.
    #[arg(long)]
    frame_stats: bool,
    /// Close the window after this many seconds (measurements, screenshots).
    #[arg(long)]
    exit_after: Option<f64>,
    /// Start training this preset as soon as the window opens.
    #[arg(long)]
    train_preset: Option<String>,
    /// Start training this config (a `train --config` JSON file naming a preset) as soon as
    /// the window opens.
    #[arg(long, value_name = "JSON")]
    train_config: Option<PathBuf>,
    #[arg(long, help = view_help())]
    view: Option<String>,
    /// Open a decomposition shipped in the binary ("tms-5-2", "days").
    #[arg(long)]
    asset: Option<String>,
    /// Rows of the data-batch CI heatmap (default 256).
    #[arg(long)]
    heatmap_rows: Option<usize>,
    /// Select a subcomponent (`module:index`, e.g. blocks.1.attn.q_proj:3) once loaded.
    #[arg(long, value_name = "MODULE:INDEX")]
    select: Option<String>,
    /// The Prompt view's text (language models).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// What the Prompt view intervenes on (`module:index`, `cluster:id`, ..., comma-separated;
    /// ablated unless the view's mask slider is moved).
    #[arg(long, value_name = "SPEC")]
    intervene: Option<String>,
    /// Export the view (--view) over the run's timeline, then quit: an animated GIF (a .gif
    /// path) or numbered PNGs (a folder). Playback speed: --fps.
    #[arg(long, value_name = "OUT.gif|DIR")]
    export_animation: Option<PathBuf>,
    /// Play the run's timeline from its first frame once loaded (with --frame-stats: the UI's
    /// CPU time per frame while scrubbing).
    #[arg(long)]
    play: bool,
    /// Frames per second of playback and of --export-animation.
    #[arg(long, default_value_t = 8.0)]
    fps: f32,
    /// At most this many frames in --export-animation (evenly spread; first and last kept).
    #[arg(long, default_value_t = 120)]
    export_frames: usize,
    /// Threads for training (each step's batch is split into row shards, one per thread;
    /// default: all cores, in the app all but one; at least 128 rows per shard).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Load files whose optimizer state is unusable (non-finite, half missing) without it:
    /// Adam restarts from zero when training resumes.
    #[arg(long, global = true)]
    drop_optimizer_state: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

/// How a training run keeps its timeline (frames to replay how the decomposition formed).
#[derive(clap::Args, Clone, Debug, Default)]
struct TimelineArgs {
    /// Keep at most N timeline frames (0 = none; default 300, or what a resumed file kept).
    #[arg(long, value_name = "N")]
    timeline_frames: Option<usize>,
    /// Cap on the timeline's size in MB (default 256, or what a resumed file kept).
    #[arg(long, value_name = "MB")]
    timeline_cap_mb: Option<u64>,
    /// Store frames as f32 (exact) instead of f16 (half the size).
    #[arg(long)]
    timeline_f32: bool,
}

impl TimelineArgs {
    /// The options for a run that kept `kept` so far (a resumed file) or none.
    fn options(
        &self,
        kept: Option<spdlab::timeline::TimelineOptions>,
    ) -> anyhow::Result<spdlab::timeline::TimelineOptions> {
        let mut o = kept.unwrap_or_default();
        if let Some(n) = self.timeline_frames {
            spdlab::limits::check("--timeline-frames", n, spdlab::limits::MAX_FRAMES)?;
            if n == 1 {
                anyhow::bail!(
                    "--timeline-frames 1: a timeline keeps at least the first and the last step (2), or 0 for none"
                );
            }
            o.max_frames = n;
        }
        if let Some(mb) = self.timeline_cap_mb {
            if mb == 0 {
                anyhow::bail!(
                    "--timeline-cap-mb must be at least 1 (use --timeline-frames 0 for no timeline)"
                );
            }
            o.cap_bytes = mb.saturating_mul(1 << 20);
        }
        if self.timeline_f32 {
            o.f16 = false;
        }
        Ok(o)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Train an SPD decomposition of a preset or a config file.
    Train {
        #[arg(long, conflicts_with = "config")]
        preset: Option<String>,
        /// JSON config with the reference's field names plus "preset" or "target"/"target_path".
        #[arg(long)]
        config: Option<PathBuf>,
        /// Continue a run from a .spdlab (or recovery) file.
        #[arg(long, conflicts_with_all = ["preset", "config"])]
        resume: Option<PathBuf>,
        #[arg(long)]
        steps: Option<usize>,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Where to save the result (default: spdlab-runs/<name>-seed<seed>.spdlab).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seconds between recovery autosaves (0 = off).
        #[arg(long, default_value_t = 60)]
        autosave_secs: u64,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
        /// Print one JSON object with the results on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        timeline: TimelineArgs,
    },
    /// Train a grid of configs, one folder per point (locally with --jobs, or as a Slurm job
    /// array with --emit slurm); rerun to continue. See README "Sweeps".
    Sweep(SweepArgs),
    /// Show a decomposition's timeline (frames kept while it trained: steps, size, L0 and
    /// alive subcomponents per frame), or write the file without it (--drop --out).
    Timeline {
        file: PathBuf,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Write a copy without the timeline to --out.
        #[arg(long, requires = "out")]
        drop: bool,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing --out file.
        #[arg(long)]
        force: bool,
    },
    /// Match the subcomponents of two decompositions of the same target (Hungarian on the
    /// similarity of their rank-one matrices), per module.
    Compare {
        a: PathBuf,
        b: PathBuf,
        /// Print one JSON object (pairs and both sides' U, V) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a saved decomposition.
    Eval {
        file: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Steady-state training throughput (steps per second), as JSON.
    Bench {
        #[arg(long)]
        preset: String,
        #[arg(long, default_value_t = 200)]
        steps: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Measure every thread count from 1 to the number of cores (each in its own
        /// process, as thread pools are sized once) and report steps/s for each.
        #[arg(long)]
        threads_scan: bool,
        /// Repeat each measurement this many times and report the median.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// Causal importances of every subcomponent on chosen inputs.
    Ci {
        /// A .spdlab file or a goodfire-ai/spd run (folder or model_<step>.pth).
        file: PathBuf,
        /// JSON file {"inputs": [[...], ...]}, `probes[:VALUE]` or `batch:N[:SEED]`.
        #[arg(long, required_unless_present = "text", conflicts_with = "text")]
        inputs: Option<String>,
        /// Language models: text, tokenized with the run's tokenizer (CI per token).
        #[arg(long)]
        text: Option<String>,
        /// The tokenizer (tokenizer.json or its folder) for --text; default: the run's
        /// tokenizer_name resolved locally, or tokenizer.json in the run folder.
        #[arg(long, requires = "text")]
        tokenizer: Option<PathBuf>,
        /// Report the upper-leaky CI (the minimality loss's) instead of the lower-leaky (masks').
        #[arg(long)]
        upper: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Intervene: ablate (or otherwise mask) a selection of subcomponents, clusters or layers
    /// and report how every output changes.
    Ablate {
        /// A .spdlab file or a goodfire-ai/spd run.
        file: PathBuf,
        /// What to intervene on: `layer:index`, `layer:a-b`, `layer:*`, `cluster:id`
        /// (comma-separated).
        #[arg(long)]
        select: String,
        /// JSON file {"inputs": [[...], ...]}, `probes[:VALUE]` or `batch:N[:SEED]`.
        #[arg(long, default_value = "probes")]
        inputs: String,
        /// Mask of the selection: ablate, keep, ci, stochastic.
        #[arg(long, default_value = "ablate")]
        mode: String,
        /// Mask of everything else: keep, ablate, ci, stochastic.
        #[arg(long, default_value = "keep")]
        others: String,
        /// Keep the delta component (W_target − Σ subcomponents) at weight 1 (off by default).
        #[arg(long)]
        delta: bool,
        /// Seed of the stochastic masks.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Report what a decomposition of the `days` preset found: the rotation mechanism of each
    /// operation against the known construction, the per-day embedding, and the unlearning
    /// test (ablate the mechanism's cluster).
    Days {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Report what a decomposition of the `tiny-lm` preset does to the language's planted
    /// rules (day after, copying a name, counting): each rule's accuracy on held-out stories
    /// for the target and the CI-masked decomposition, with a selection ablated, and per
    /// stored cluster with that cluster ablated (targeted unlearning).
    Rules {
        file: PathBuf,
        /// Ablate this selection (`module:index`, `module:*`, `cluster:id`, comma-separated).
        #[arg(long)]
        ablate: Option<String>,
        /// Held-out stories to score.
        #[arg(long, default_value_t = 500)]
        stories: usize,
        /// Targeted unlearning of this rule (day_after, copy, count) with the stored clusters:
        /// the clusters active where it applies, each ablated alone, then ablated together
        /// while the other rules stay ≥ 0.9, until it is ≤ 0.2.
        #[arg(long)]
        unlearn: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Harvest a language-model decomposition: one pass over its text recording, for every
    /// subcomponent, how often it fires, its top-activating contexts and the tokens it fires
    /// on; stored in the file (--save) so component pages open instantly.
    Harvest {
        file: PathBuf,
        /// Token positions to scan (windows of the run's sequence length).
        #[arg(long, default_value_t = 1_000_000)]
        tokens: usize,
        /// Store the harvest in this .spdlab file (may be FILE itself: an in-place update).
        #[arg(long)]
        save: Option<PathBuf>,
        /// Replace an existing --save file other than FILE.
        #[arg(long)]
        force: bool,
        /// Print the harvest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Convert a goodfire-ai/spd run into a .spdlab file.
    Import {
        run: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
    /// Group subcomponents into mechanisms (MDL merge clustering on CI co-activation).
    Cluster {
        file: PathBuf,
        /// Rank weight α of the description length (the reference's default is 1; see
        /// cluster::DEFAULT_ALPHA for why spdlab uses 2).
        #[arg(long, default_value_t = spdlab::cluster::DEFAULT_ALPHA)]
        alpha: f64,
        /// CI above which a subcomponent counts as firing.
        #[arg(long, default_value_t = 0.01)]
        threshold: f32,
        /// Seeds the data batch and the pair sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Number of groups to report (default: where the description length is minimal).
        #[arg(long)]
        k: Option<usize>,
        #[arg(long, default_value_t = 4096)]
        samples: usize,
        /// Subcomponents whose CI never reaches this (or the activation threshold, whichever is
        /// larger) on the batch are dropped as dead.
        #[arg(long, default_value_t = 0.001)]
        dead_threshold: f32,
        /// Pair sampler band: merge a uniformly random pair among those with cost within this
        /// fraction of the cost range above the minimum (0 = always a cheapest pair).
        #[arg(long, default_value_t = 0.05)]
        range_threshold: f64,
        /// Which CI to cluster on: upper (upper-leaky, the reference's) or lower.
        #[arg(long, value_enum, default_value_t = spdlab::cluster::CiSource::Upper)]
        ci: spdlab::cluster::CiSource,
        /// Store the result in this .spdlab file (may be FILE itself: an in-place update).
        #[arg(long)]
        save: Option<PathBuf>,
        /// Replace an existing --save file other than FILE.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// List the presets, or print one preset's full config (a starting point for --config).
    Presets {
        /// Print this preset's config as JSON (with "preset" set), ready to edit.
        #[arg(long)]
        show: Option<String>,
    },
    /// Write a preset's target, tokenizer and text as the reference library (goodfire-ai/spd)
    /// reads them, so the same model can be decomposed there (tiny-lm: target/ with
    /// model_config.yaml and model.safetensors, tokenizer/, data/train.jsonl and test.jsonl).
    ExportReference {
        #[arg(long)]
        preset: String,
        /// The folder to write.
        #[arg(long)]
        out: PathBuf,
        /// Training stories in data/train.jsonl (default: the 40,000 spdlab's preset trains on).
        #[arg(long)]
        stories: Option<usize>,
        /// Replace existing files in the folder.
        #[arg(long)]
        force: bool,
    },
    /// Train a new target model for a preset and save it (how assets/targets were made).
    TrainTarget {
        #[arg(long)]
        preset: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training steps (default: the preset's recipe).
        #[arg(long)]
        steps: Option<usize>,
        /// The target file (tiny-lm: a folder for the model, its config, tokenizer and
        /// accuracy report).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
}

fn main() {
    // Keep freed pages instead of returning them to the OS after 10 ms: a training step frees
    // and reallocates the same large buffers, and re-faulting them cost ~25% of a step.
    // (mi_option_purge_delay = 15 in mimalloc v2's option enum; -1 = never purge.)
    unsafe {
        libmimalloc_sys::mi_option_set(15, -1);
    }
    let cli = Cli::parse();
    spdlab::io::spdlab_file::set_drop_optimizer_state(cli.drop_optimizer_state);
    // Before any tensor work or thread exists: candle single-threaded, training steps split
    // into row shards on `--threads` threads (default: all cores). See spdlab::parallel.
    // The app leaves one core to the UI and the renderer: with a 4096-row CI heatmap while
    // resid-mlp-1 trained, the UI's CPU time per frame had p99 9.8 ms with 2 training threads
    // on 2 cores and 7.3 ms with 1, for 5% fewer steps/s.
    let threads = cli.threads.or_else(|| {
        cli.cmd
            .is_none()
            .then(|| spdlab::parallel::default_threads().saturating_sub(1).max(1))
    });
    unsafe {
        spdlab::parallel::configure(threads);
    }
    #[cfg(unix)]
    if cli.cmd.is_some() {
        // A CLI report piped into `head` should end quietly when the pipe closes, as other
        // command-line tools do, instead of panicking in println!.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let res = match cli.cmd {
        None => match cli
            .view
            .as_deref()
            .map(|v| (v, spdlab::app::view_from_name(v)))
        {
            Some((v, None)) => Err(anyhow::anyhow!(
                "unknown view {v:?}: use one of {}",
                spdlab::app::view_names().join(", ")
            )),
            view => spdlab::app::run(spdlab::app::StartOptions {
                file: cli.file,
                frame_stats: cli.frame_stats,
                exit_after: cli.exit_after.map(Duration::from_secs_f64),
                train_preset: cli.train_preset,
                train_config: cli.train_config,
                view: view.and_then(|(_, v)| v),
                asset: cli.asset,
                heatmap_rows: cli.heatmap_rows,
                select: cli.select,
                prompt: cli.prompt,
                intervene: cli.intervene,
                export_animation: cli.export_animation,
                fps: cli.fps,
                play: cli.play,
                export_frames: cli.export_frames,
            }),
        },
        Some(cmd) => run(cmd),
    };
    if let Err(e) = res {
        let msg = format!("{e:#}");
        eprintln!("error: {}", msg.lines().next().unwrap_or("unknown error"));
        std::process::exit(1);
    }
}

#[derive(clap::Args)]
struct SweepArgs {
    /// A sweep folder: continue it, show it (--status), run one point (--point) or write
    /// its job-array script (--emit slurm).
    dir: Option<PathBuf>,
    /// Create a sweep over this preset's config ...
    #[arg(long, conflicts_with_all = ["config", "dir"])]
    preset: Option<String>,
    /// ... or over a `train --config` file.
    #[arg(long, conflicts_with = "dir")]
    config: Option<PathBuf>,
    /// An axis: PATH=V1,V2,... or PATH=A..B (integers). PATH: loss.<Class>.<field>,
    /// C.<module>, lr, or any config field (seed, steps, batch_size, ...). Repeatable.
    #[arg(long = "grid", value_name = "PATH=VALUES")]
    grid: Vec<String>,
    /// Steps of every point (a shorthand for --grid steps=N).
    #[arg(long)]
    steps: Option<usize>,
    /// The sweep folder to create (with --preset or --config).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Points run at once, each in its own process with the threads split between them.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Run only this point, in this process (what a job-array task runs).
    #[arg(long)]
    point: Option<usize>,
    /// Write DIR/slurm.sh, a job array with one task per point, instead of running.
    #[arg(long, value_name = "slurm")]
    emit: Option<String>,
    /// Show the points' states and results without running anything.
    #[arg(long)]
    status: bool,
    /// Print the points' results as one JSON array on stdout.
    #[arg(long)]
    json: bool,
    /// Seconds between a running point's recovery saves.
    #[arg(long, default_value_t = 30)]
    autosave_secs: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// `spdlab ci RUN --text`: the text's tokens through a language-model decomposition, CI per
/// module per token (windows of the run's sequence length; a short last window is padded with
/// EOS, which a causal model's earlier positions never see).
fn text_ci(
    file: &std::path::Path,
    tr: &Trainer,
    text: &str,
    tokenizer: Option<&std::path::Path>,
    upper: bool,
    json: bool,
) -> anyhow::Result<()> {
    let spdlab::model::TargetSpec::Lm { model, seq_len } = &tr.model.target.spec else {
        anyhow::bail!(
            "{}: --text needs a language-model decomposition (this one is {})",
            file.display(),
            tr.model.target.spec.family()
        );
    };
    let tok = match tokenizer {
        Some(p) => spdlab::text::TextTokenizer::load(p)?,
        None => spdlab::text::run_tokenizer(&tr.config, file)?,
    };
    let ids = tok
        .encode_for(text, model.vocab_size)
        .map_err(|e| anyhow::anyhow!("--text: {e}"))?;
    let s = *seq_len;
    let rows: Vec<Vec<f32>> = ids
        .chunks(s)
        .map(|w| spdlab::text::row_of(w, s, &tok))
        .collect();
    let rep = runner::ci_report(&tr.model, &rows, upper)?;
    let labels = tok.token_strings(&ids);
    let n = ids.len();
    let names: Vec<String> = tr.model.modules.iter().map(|m| m.name.clone()).collect();
    if json {
        let ci: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .map(|m| (m.clone(), serde_json::json!(rep.ci[m][..n])))
            .collect();
        let acts: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .map(|m| (m.clone(), serde_json::json!(rep.component_acts[m][..n])))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "tokenizer": tok.path,
                "ids": ids,
                "tokens": labels,
                "ci_type": rep.ci_type,
                "kl_ci_masked": rep.kl_ci_masked[..n],
                "ci": ci,
                "component_acts": acts,
            })
        );
        return Ok(());
    }
    let thr = tr.config.ci_alive_threshold.max(0.1) as f32;
    println!(
        "{} tokens ({} window{} of {s}); {} CI; subcomponents with CI > {thr} per module (index:CI, strongest first)",
        n,
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        rep.ci_type
    );
    for (p, label) in labels.iter().enumerate() {
        println!(
            "[{p:>4}] {:<14} KL(target||CI-masked) {:.4}",
            format!("{label:?}"),
            rep.kl_ci_masked[p]
        );
        for m in &names {
            let row = &rep.ci[m][p];
            let mut on: Vec<(usize, f32)> = row
                .iter()
                .copied()
                .enumerate()
                .filter(|&(_, v)| v > thr)
                .collect();
            on.sort_by(|a, b| b.1.total_cmp(&a.1));
            let shown: Vec<String> = on
                .iter()
                .take(8)
                .map(|(c, v)| format!("{c}:{v:.2}"))
                .collect();
            println!(
                "         {m:<22} {:>3} on  {}{}",
                on.len(),
                shown.join(" "),
                if on.len() > 8 { " ..." } else { "" }
            );
        }
    }
    Ok(())
}

/// `spdlab sweep`: create or open a sweep folder, then run a point, the pool, or write the
/// job-array script; print the points' results.
fn run_sweep(a: SweepArgs, threads: Option<usize>) -> anyhow::Result<()> {
    use spdlab::sweep::{PointState, Sweep, SweepSpec, parse_axis};
    let sweep = match (&a.preset, &a.config, &a.dir) {
        (None, None, Some(d)) => {
            if !a.grid.is_empty() || a.steps.is_some() || a.out.is_some() {
                anyhow::bail!(
                    "{}: --grid, --steps and --out create a sweep (with --preset or --config); an existing sweep keeps its grid",
                    d.display()
                );
            }
            Sweep::open(d)?
        }
        (p, c, None) if p.is_some() || c.is_some() => {
            let out = a
                .out
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("give the sweep folder with --out DIR"))?;
            let mut base = match (p, c) {
                (Some(p), _) => presets::config_file_json(p)?,
                (None, Some(c)) => {
                    // Validate as `train --config` does, then keep the JSON with the target's
                    // path made absolute (points live in other folders).
                    runner::load_config_file(c, &runner::device("cpu")?)?;
                    let mut v: serde_json::Value =
                        serde_json::from_str(&std::fs::read_to_string(c)?)?;
                    if let Some(t) = runner::config_target_path(c)? {
                        v["target_path"] = serde_json::Value::String(
                            std::path::absolute(&t)?.display().to_string(),
                        );
                    }
                    v
                }
                _ => unreachable!(),
            };
            if let Some(s) = a.steps {
                spdlab::limits::check_positive("--steps", s, spdlab::limits::MAX_STEPS)?;
                base["steps"] = s.into();
            }
            if a.grid.is_empty() {
                anyhow::bail!("give at least one --grid PATH=VALUES");
            }
            let axes = a
                .grid
                .iter()
                .map(|g| parse_axis(g))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Sweep::create(out, SweepSpec { base, axes })?
        }
        (_, _, Some(_)) => anyhow::bail!("give either a sweep folder or --preset/--config"),
        _ => anyhow::bail!(
            "give a sweep folder, or create one with --preset NAME (or --config FILE) --grid PATH=VALUES --out DIR"
        ),
    };
    let mut sweep = sweep;
    if a.autosave_secs == 0 {
        anyhow::bail!(
            "--autosave-secs must be at least 1 (a sweep point always keeps a recovery file)"
        );
    }
    sweep.autosave = Duration::from_secs(a.autosave_secs);
    let n = sweep.points().len();
    if let Some(i) = a.point {
        return sweep.run_point(i, &runner::device(&a.device)?);
    }
    if let Some(kind) = &a.emit {
        if kind != "slurm" {
            anyhow::bail!("--emit {kind}: only slurm is supported");
        }
        let exe = std::env::current_exe()?;
        let cpus = threads.unwrap_or(1);
        let path = sweep.dir.join("slurm.sh");
        spdlab::io::atomic::write_atomic(&path, sweep.slurm_script(&exe, cpus).as_bytes())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        eprintln!(
            "wrote {} ({n} tasks); submit it with: sbatch {}",
            path.display(),
            path.display()
        );
        return Ok(());
    }
    if !a.status {
        if a.device != "cpu" {
            anyhow::bail!(
                "the local pool runs on the CPU; use --point with --device for one point"
            );
        }
        let cores = spdlab::parallel::default_threads();
        let total = threads.unwrap_or(cores);
        let jobs = a.jobs.clamp(1, n.max(1));
        let per = (total / jobs).max(1);
        let exe = std::env::current_exe()?;
        let bar = progress_bar(n as u64);
        let failed = sweep.run_pool(&exe, jobs, per, |done, _, err| {
            bar.set_position(done as u64);
            if let Some(e) = err {
                bar.println(format!("error: {e}"));
            }
        })?;
        bar.finish_and_clear();
        if !failed.is_empty() {
            print::sweep_table(&sweep);
            anyhow::bail!(
                "{} of {n} points failed (their errors: points/pNNN/stderr.log); rerun to retry them",
                failed.len()
            );
        }
    }
    if a.json {
        let rows: Vec<serde_json::Value> = sweep
            .points()
            .iter()
            .map(|p| {
                serde_json::json!({
                    "index": p.index,
                    "values": p.values.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<serde_json::Map<_, _>>(),
                    "state": sweep.state(p.index),
                    "summary": sweep.summary(p.index),
                })
            })
            .collect();
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        print::sweep_table(&sweep);
        let finished = (0..n)
            .filter(|&i| sweep.state(i) == PointState::Finished)
            .count();
        eprintln!(
            "{finished} of {n} points finished; folder {}",
            sweep.dir.display()
        );
    }
    Ok(())
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Presets { show: Some(name) } => {
            let v = presets::config_file_json(&name)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Presets { show: None } => {
            for p in presets::PRESETS {
                println!("{:<14} {}", p.name, p.description);
            }
            Ok(())
        }
        Cmd::Timeline {
            file,
            json,
            drop,
            out,
            force,
        } => {
            let dev = runner::device("cpu")?;
            let (mut tr, extras, _) = spdlab::io::load_any(&file, &dev)?;
            let Some(tl) = tr.timeline.as_ref() else {
                anyhow::bail!(
                    "{}: no timeline (it trained without one: --timeline-frames 0, or an older spdlab)",
                    file.display()
                );
            };
            let thr = tr.config.ci_alive_threshold as f32;
            let frames: Vec<serde_json::Value> = tl
                .frames
                .iter()
                .map(|f| {
                    let per: serde_json::Map<String, serde_json::Value> = tr
                        .model
                        .modules
                        .iter()
                        .zip(f.stats.iter())
                        .map(|(m, s)| {
                            let alive = s.max_ci.iter().filter(|&&x| x > thr).count();
                            (
                                m.name.clone(),
                                serde_json::json!({ "l0": s.l0, "alive": alive }),
                            )
                        })
                        .collect();
                    serde_json::json!({ "step": f.step, "modules": per })
                })
                .collect();
            let info = serde_json::json!({
                "file": file,
                "frames": tl.frames.len(),
                "every": tl.every,
                "dtype": if tl.options.f16 { "f16" } else { "f32" },
                "max_frames": tl.options.max_frames,
                "cap_bytes": tl.options.cap_bytes,
                "bytes": tl.bytes(),
                "per_frame": frames,
            });
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!(
                    "{}: {} frames, steps {} to {} (every {}), {}, {:.2} MB (cap {} MB, at most {} frames)",
                    file.display(),
                    tl.frames.len(),
                    tl.frames.first().map(|f| f.step).unwrap_or(0),
                    tl.frames.last().map(|f| f.step).unwrap_or(0),
                    tl.every,
                    if tl.options.f16 { "f16" } else { "f32" },
                    tl.bytes() as f64 / (1 << 20) as f64,
                    tl.options.cap_bytes >> 20,
                    tl.options.max_frames
                );
                for f in &frames {
                    let mods: Vec<String> = f["modules"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| {
                            format!(
                                "{k}: L0 {:.2}, alive {}",
                                v["l0"].as_f64().unwrap_or(0.0),
                                v["alive"]
                            )
                        })
                        .collect();
                    println!("  step {:>8}  {}", f["step"], mods.join(" | "));
                }
            }
            if drop && let Some(out) = out {
                let replace = if force {
                    Replace::Allowed
                } else {
                    Replace::Never
                };
                let _lock = spdlab::io::output::prepare(&out, &[file.as_path()], replace)?;
                tr.timeline = None;
                spdlab_file::save(&tr, &extras, &out)?;
                eprintln!("wrote {} without the timeline", out.display());
            }
            Ok(())
        }
        Cmd::Compare { a, b, json } => {
            let c = spdlab::compare::compare_files(&a, &b)?;
            if json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                for m in &c.modules {
                    println!(
                        "{}: {} pairs (C {} vs {}), {} with similarity >= 0.9, {} >= 0.5",
                        m.name,
                        m.pairs.len(),
                        m.c_a,
                        m.c_b,
                        m.matched_above(0.9),
                        m.matched_above(0.5)
                    );
                    for (i, j, s) in &m.pairs {
                        println!("  {i:>4} ~ {j:<4} {s:.3}");
                    }
                }
            }
            Ok(())
        }
        Cmd::Sweep(args) => run_sweep(
            args,
            spdlab::parallel::explicit().then(spdlab::parallel::threads),
        ),
        Cmd::Train {
            preset,
            config,
            resume,
            steps,
            seed,
            device,
            out,
            autosave_secs,
            force,
            json,
            timeline,
        } => {
            let dev = runner::device(&device)?;
            let mut out = out;
            // Files this run reads (an output must not be one of them, but a resumed run may
            // save over the file it resumed: the documented in-place continuation).
            let mut inputs: Vec<PathBuf> = config.iter().cloned().collect();
            let mut in_place: Option<PathBuf> = None;
            let (mut tr, mut extras, name) = if let Some(path) = resume {
                let (mut tr, extras) = spdlab_file::load(&path, &dev)?;
                if let Some(s) = steps {
                    // Extend or shorten the run; the LR schedule follows the new length.
                    spdlab::limits::check_positive("--steps", s, spdlab::limits::MAX_STEPS)?;
                    if s + 1 < tr.step {
                        anyhow::bail!(
                            "{}: the run has already trained {} steps; --steps {s} would end it before where it is",
                            path.display(),
                            tr.step
                        );
                    }
                    tr.config.steps = s;
                }
                if seed.is_some() {
                    anyhow::bail!(
                        "--seed does not apply to --resume (the run keeps its RNG state)"
                    );
                }
                in_place = Some(path.clone());
                let name = extras.preset.clone().unwrap_or_else(|| "run".into());
                // Resuming X.spdlab.recovery saves to X.spdlab unless told otherwise.
                if out.is_none() {
                    out = Some(
                        match path.to_str().and_then(|p| p.strip_suffix(".recovery")) {
                            Some(base) => PathBuf::from(base),
                            None => path.clone(),
                        },
                    );
                }
                (tr, extras, name)
            } else {
                let (mut cfg, target, preset_name) = match (&preset, &config) {
                    (Some(p), None) => (
                        presets::spd_config(p)?,
                        presets::target_model(p, &dev)?,
                        Some(p.clone()),
                    ),
                    (None, Some(c)) => runner::load_config_file(c, &dev)?,
                    _ => anyhow::bail!("give --preset NAME or --config FILE (or --resume FILE)"),
                };
                if let Some(s) = steps {
                    spdlab::limits::check_positive("--steps", s, spdlab::limits::MAX_STEPS)?;
                    cfg.steps = s;
                }
                if let Some(s) = seed {
                    cfg.seed = s;
                }
                if let Some(c) = &config {
                    inputs.extend(runner::config_target_path(c)?);
                }
                let name = preset_name.clone().unwrap_or_else(|| "config".into());
                let tr = Trainer::new(target, cfg)?;
                let extras = FileExtras {
                    preset: preset_name,
                    ..Default::default()
                };
                (tr, extras, name)
            };
            if let spdlab::data::TaskData::Tokens(d) = &tr.data {
                match d.rows {
                    None => eprintln!("warning: language-model batches are {}", d.source),
                    Some(_) => eprintln!(
                        "text: {} ({} windows of {} tokens)",
                        d.source,
                        d.n_rows(),
                        d.seq_len
                    ),
                }
            }
            let kept = tr.timeline.as_ref().map(|t| t.options);
            tr.set_timeline(timeline.options(kept)?);
            let out = out.unwrap_or_else(|| {
                PathBuf::from("spdlab-runs").join(format!("{name}-seed{}.spdlab", tr.config.seed))
            });
            // Check the output (and its recovery file) before the first step, and hold its
            // lock while training.
            let resumed_here = in_place
                .as_deref()
                .is_some_and(|p| spdlab::io::output::same_file(p, &out));
            let replace = if force || resumed_here {
                Replace::Allowed
            } else {
                Replace::Never
            };
            let input_refs: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
            let _lock = spdlab::io::output::prepare(&out, &input_refs, replace)?;
            let recovery = recovery_path(&out);
            spdlab::io::output::check_replaceable(&recovery).map_err(|e| anyhow::anyhow!("{e}"))?;
            let opts = RunOptions {
                autosave: (autosave_secs > 0)
                    .then(|| (recovery.clone(), Duration::from_secs(autosave_secs))),
            };
            let total = tr.config.steps;
            let start_step = tr.step;
            let bar = progress_bar(total as u64 + 1);
            bar.set_position(start_step as u64);
            let t0 = Instant::now();
            let secs = runner::run_training(&mut tr, &mut extras, &opts, |t, rec| {
                if rec.step % 10 == 0 || t.is_done() {
                    let done = (rec.step + 1 - start_step) as f64;
                    let sps = done / t0.elapsed().as_secs_f64().max(1e-9);
                    let l0: Vec<String> =
                        rec.l0.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
                    bar.set_position(rec.step as u64 + 1);
                    bar.set_message(format!(
                        "loss {:.3e} | L0 {} | {:.0} steps/s",
                        rec.losses["total"],
                        l0.join(", "),
                        sps
                    ));
                }
            })?;
            bar.finish_and_clear();
            let trained = (total + 1).saturating_sub(start_step);
            let report = runner::final_eval(&mut tr)?;
            spdlab_file::save(&tr, &extras, &out)?;
            let _ = std::fs::remove_file(&recovery);
            let mut summary = TrainSummary::new(
                &report,
                extras.preset.clone(),
                (total, start_step, secs),
                out.clone(),
            );
            if tr.config.tokenizer_name.as_deref() == Some(spdlab::tinylm::BUILTIN) {
                let tok = spdlab::tinylm::tokenizer()?;
                summary.rules = Some(spdlab::tinylm::decomposition_rules(
                    &tr.model, &tok, 500, None,
                )?);
            }
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print::eval_report(&report);
                if let Some(r) = &summary.rules {
                    print::rules_table(r);
                }
                eprintln!(
                    "trained {} steps in {:.1} s ({:.1} steps/s); saved to {}",
                    trained,
                    secs,
                    summary.steps_per_second,
                    out.display()
                );
            }
            Ok(())
        }
        Cmd::Ci {
            file,
            inputs,
            text,
            tokenizer,
            upper,
            device,
            json,
        } => {
            let dev = runner::device(&device)?;
            let (tr, _, warnings) = spdlab::io::load_any(&file, &dev)?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            if let Some(text) = text {
                return text_ci(&file, &tr, &text, tokenizer.as_deref(), upper, json);
            }
            let inputs = inputs.unwrap_or_default();
            let x = spdlab::inputs::resolve_inputs(&inputs, &tr)?;
            let rep = runner::ci_report(&tr.model, &x, upper)?;
            if json {
                println!("{}", serde_json::to_string(&rep)?);
            } else {
                print::ci_report(&rep);
            }
            Ok(())
        }
        Cmd::Ablate {
            file,
            select,
            inputs,
            mode,
            others,
            delta,
            seed,
            device,
            json,
        } => {
            use spdlab::interventions::*;
            let dev = runner::device(&device)?;
            let (tr, extras, warnings) = spdlab::io::load_any(&file, &dev)?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            let clusters = stored_clusters(&extras.extra)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let selection = Selection::parse(&select, &tr.model, clusters.as_ref())
                .map_err(|e| anyhow::anyhow!("--select: {e}"))?;
            let iv = Intervention {
                selection,
                selected_mode: MaskMode::parse(&mode)
                    .map_err(|e| anyhow::anyhow!("--mode: {e}"))?,
                other_mode: MaskMode::parse(&others)
                    .map_err(|e| anyhow::anyhow!("--others: {e}"))?,
                delta,
            };
            let x = spdlab::inputs::resolve_inputs(&inputs, &tr)?;
            let res = run_intervention(&tr.model, &x, &iv, &mut spdlab::rng::Rng::new(seed))?;
            if json {
                let v = serde_json::json!({
                    "selection": iv.selection.labels(&tr.model),
                    "mode": iv.selected_mode,
                    "others": iv.other_mode,
                    "delta": iv.delta,
                    "result": res,
                });
                println!("{v}");
            } else {
                print::intervention(
                    &tr.model.target.spec,
                    &iv.selection.labels(&tr.model),
                    &iv,
                    &res,
                );
            }
            Ok(())
        }
        Cmd::Rules {
            file,
            ablate,
            stories,
            unlearn,
            json,
        } => {
            let (tr, extras, warnings) = spdlab::io::load_any(&file, &candle_core::Device::Cpu)?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            spdlab::limits::check("--stories", stories, 100_000)?;
            let stored = spdlab::interventions::stored_clusters(&extras.extra)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            if unlearn.is_some() && stored.is_none() {
                anyhow::bail!(
                    "{}: no stored clustering (run `spdlab cluster FILE --save FILE` first)",
                    file.display()
                );
            }
            let tok = spdlab::text::run_tokenizer(&tr.config, &file)?;
            let sel = ablate
                .as_deref()
                .map(|a| {
                    spdlab::interventions::Selection::parse(a, &tr.model, stored.as_ref())
                        .map_err(|e| anyhow::anyhow!("--ablate: {e}"))
                })
                .transpose()?;
            let rep = spdlab::tinylm::rules_report(
                &tr.model,
                &tok,
                stories,
                sel.as_ref(),
                match (&unlearn, &stored) {
                    (Some(r), Some(cl)) => Some((
                        spdlab::tinylm::Rule::parse(r)
                            .map_err(|e| anyhow::anyhow!("--unlearn: {e}"))?,
                        cl,
                    )),
                    _ => None,
                },
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            if json {
                println!("{}", serde_json::to_string(&rep)?);
            } else {
                print::rules_report(&rep);
            }
            Ok(())
        }
        Cmd::Harvest {
            file,
            tokens,
            save,
            force,
            json,
        } => {
            spdlab::limits::check_positive("--tokens", tokens, 1 << 32)?;
            let _lock = save_lock(save.as_deref(), &file, force)?;
            let (tr, mut extras, warnings) =
                spdlab::io::load_any(&file, &candle_core::Device::Cpu)?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            let t0 = Instant::now();
            let bar = progress_bar(0);
            let cancel = std::sync::atomic::AtomicBool::new(false);
            let h = spdlab::harvest::harvest_run(&tr, tokens, &cancel, &|d, n| {
                bar.set_length(n as u64);
                bar.set_position(d as u64);
            })
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            bar.finish_and_clear();
            let secs = t0.elapsed().as_secs_f64();
            if json {
                println!("{}", serde_json::to_string(&h)?);
            } else {
                let tok = spdlab::text::run_tokenizer(&tr.config, &file).ok();
                print::harvest(&h, tok.as_ref());
            }
            eprintln!(
                "harvested {} tokens ({} windows) in {secs:.1} s ({:.0} tokens/s, {} threads)",
                h.positions,
                h.windows,
                h.positions as f64 / secs,
                spdlab::parallel::threads()
            );
            if let Some(out) = save {
                extras
                    .extra
                    .insert(spdlab::harvest::EXTRA_KEY.into(), serde_json::to_value(&h)?);
                spdlab_file::save(&tr, &extras, &out)?;
                eprintln!("saved the harvest to {}", out.display());
            }
            Ok(())
        }
        Cmd::Days { file, json } => {
            let (tr, extras, warnings) = spdlab::io::load_any(&file, &candle_core::Device::Cpu)?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            let clusters = spdlab::interventions::stored_clusters(&extras.extra)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let rep = spdlab::metrics::days::days_report(&tr.model, clusters.as_ref())
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            if json {
                println!("{}", serde_json::to_string(&rep)?);
            } else {
                print::days_report(&rep);
            }
            Ok(())
        }
        Cmd::Cluster {
            file,
            alpha,
            threshold,
            seed,
            k,
            samples,
            dead_threshold,
            range_threshold,
            ci,
            save,
            force,
            device,
            json,
        } => {
            let dev = runner::device(&device)?;
            // Flags first: nonsense values would give a nonsense clustering.
            if !(alpha.is_finite() && alpha > 0.0) {
                anyhow::bail!("--alpha must be a finite number > 0, got {alpha}");
            }
            for (flag, v) in [
                ("--threshold", threshold),
                ("--dead-threshold", dead_threshold),
            ] {
                if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                    anyhow::bail!("{flag} must be in [0, 1], got {v}");
                }
            }
            if !(range_threshold.is_finite() && (0.0..=1.0).contains(&range_threshold)) {
                anyhow::bail!("--range-threshold must be in [0, 1], got {range_threshold}");
            }
            if k == Some(0) {
                anyhow::bail!("--k must be at least 1");
            }
            spdlab::limits::check_positive("--samples", samples, spdlab::limits::MAX_SAMPLES)?;
            let _lock = save_lock(save.as_deref(), &file, force)?;
            let (tr, mut extras, warnings) = spdlab::io::load_any(&file, &dev)?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            let opts = spdlab::cluster::ClusterOptions {
                alpha,
                activation_threshold: threshold,
                seed,
                n_samples: samples,
                filter_dead_threshold: dead_threshold,
                range_threshold,
                ci,
            };
            let h = spdlab::cluster::cluster(&tr, &opts)?;
            let k = k.unwrap_or_else(|| h.best_k());
            let res = spdlab::cluster::summarize(&h, &opts, k).with_score(&tr.model)?;
            if json {
                println!("{}", serde_json::to_string(&res)?);
            } else {
                println!(
                    "{} clusters at k = {} (minimum description length at k = {}); {} dead subcomponents filtered",
                    res.clusters.len(),
                    res.k,
                    res.best_k,
                    res.dead.len()
                );
                for c in &res.clusters {
                    println!(
                        "  cluster {:>3}: rank {:>3}, fires on {:>6.2}% of inputs, layers {}: {}",
                        c.id,
                        c.rank,
                        100.0 * c.firing_fraction,
                        c.layers.join(","),
                        c.members.join(" ")
                    );
                }
                println!("description length (normalised) along the merge history:");
                let step = (res.description_length.len() / 12).max(1);
                for (kk, dl) in res.description_length.iter().step_by(step) {
                    println!("  k = {kk:>4}: {dl:.4}");
                }
                if let Some(sc) = &res.score {
                    println!(
                        "against the known answer ({}; {} classes over {} alive subcomponents):",
                        sc.description, sc.n_classes, sc.n_scored
                    );
                    if let Some((kk, p, a)) = sc.at(res.k) {
                        println!(
                            "  at the chosen k = {kk}: purity {p:.3}, adjusted Rand index {a:.3}"
                        );
                    }
                    if let Some((kk, p, a)) = sc.best() {
                        println!("  best cut: k = {kk}: purity {p:.3}, adjusted Rand index {a:.3}");
                    }
                }
            }
            if let Some(out) = save {
                extras
                    .extra
                    .insert("clusters".into(), serde_json::to_value(&res)?);
                spdlab_file::save(&tr, &extras, &out)?;
                eprintln!("saved clusters to {}", out.display());
            }
            Ok(())
        }
        Cmd::Import { run, out, force } => {
            let dev = candle_core::Device::Cpu;
            let (ckpt, _) = spdlab::io::reference::resolve_checkpoint(&run)?;
            let run_dir = ckpt
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .to_path_buf();
            let replace = if force {
                Replace::Allowed
            } else {
                Replace::Never
            };
            let _lock = spdlab::io::output::prepare(&out, &[&run, &ckpt, &run_dir], replace)?;
            let (tr, info) = spdlab::io::reference::import(&run, &dev)?;
            for w in &info.warnings {
                eprintln!("warning: {w}");
            }
            let extras = FileExtras {
                warmup_done: true,
                ..Default::default()
            };
            spdlab_file::save(&tr, &extras, &out)?;
            eprintln!("imported {} → {}", info.checkpoint.display(), out.display());
            Ok(())
        }
        Cmd::Eval { file, device, json } => {
            let dev = runner::device(&device)?;
            let (mut tr, _, warnings) = spdlab::io::load_any(&file, &dev)?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            let report = runner::final_eval(&mut tr)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print::eval_report(&report);
            }
            Ok(())
        }
        Cmd::Bench {
            preset,
            steps,
            device,
            threads_scan,
            repeat,
        } => {
            spdlab::limits::check_positive("--steps", steps, spdlab::limits::MAX_STEPS)?;
            spdlab::limits::check_positive("--repeat", repeat, 1000)?;
            if threads_scan || repeat > 1 {
                // Explicit counts, then the default (no --threads): each in a new process.
                let counts: Vec<Option<usize>> = if threads_scan {
                    (1..=spdlab::parallel::default_threads())
                        .map(Some)
                        .chain([None])
                        .collect()
                } else {
                    vec![spdlab::parallel::explicit().then(spdlab::parallel::threads)]
                };
                let mut rows = vec![];
                for t in counts {
                    let mut runs = vec![];
                    let mut used = serde_json::Value::Null;
                    for _ in 0..repeat {
                        let mut cmd = std::process::Command::new(std::env::current_exe()?);
                        if let Some(t) = t {
                            cmd.args(["--threads", &t.to_string()]);
                        }
                        let out = cmd
                            .args(["bench", "--preset", &preset])
                            .args(["--steps", &steps.to_string(), "--device", &device])
                            .output()?;
                        if !out.status.success() {
                            anyhow::bail!(
                                "bench with {t:?} threads failed: {}",
                                String::from_utf8_lossy(&out.stderr).trim()
                            );
                        }
                        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                        runs.push(v["steps_per_second"].as_f64().unwrap_or(f64::NAN));
                        used = serde_json::json!({"threads": v["threads"], "shards": v["shards"]});
                    }
                    runs.sort_by(f64::total_cmp);
                    rows.push(serde_json::json!({
                        "threads": t.map_or(serde_json::json!("default"), |t| serde_json::json!(t)),
                        "used": used,
                        "steps_per_second": runs[runs.len() / 2],
                        "runs": runs,
                    }));
                }
                let out = serde_json::json!({
                    "preset": preset,
                    "device": device,
                    "steps": steps,
                    "default_threads": spdlab::parallel::default_threads(),
                    "scan": rows,
                });
                println!("{out}");
                return Ok(());
            }
            let dev = runner::device(&device)?;
            let cfg = presets::spd_config(&preset)?;
            let target = presets::target_model(&preset, &dev)?;
            let mut tr = Trainer::new(target, cfg)?;
            let warm = 10.min(steps);
            for _ in 0..warm {
                tr.step()?;
            }
            let t0 = Instant::now();
            for _ in 0..steps {
                tr.step()?;
            }
            let secs = t0.elapsed().as_secs_f64();
            let out = serde_json::json!({
                "preset": preset,
                "device": device,
                "threads": spdlab::parallel::threads(),
                "shards": tr.last_shards,
                "steps": steps,
                "seconds": secs,
                "steps_per_second": steps as f64 / secs,
                "ms_per_step": secs * 1e3 / steps as f64,
            });
            println!("{out}");
            Ok(())
        }
        Cmd::ExportReference {
            preset,
            out,
            stories,
            force,
        } => {
            if preset != "tiny-lm" {
                anyhow::bail!(
                    "export-reference writes the tiny-lm preset only (the other presets' targets \
                     are the reference's own toy models: `spdlab train-target` writes them)"
                );
            }
            let n = stories.unwrap_or(spdlab::tinylm::SPD_DOCS);
            spdlab::limits::check("--stories", n, 1_000_000)?;
            export_tiny_lm_reference(&out, n, force)
        }
        Cmd::TrainTarget {
            preset,
            seed,
            steps,
            out,
            force,
        } => {
            if preset == "tiny-lm" {
                return train_tiny_lm(seed, steps, &out, force);
            }
            let spec = presets::target_spec(&preset)?;
            let replace = if force {
                Replace::Allowed
            } else {
                Replace::Never
            };
            let _lock = spdlab::io::output::prepare(&out, &[], replace)?;
            let mut cfg = spdlab::model::TargetTrainConfig::reference(&spec, seed);
            if let Some(n) = steps {
                cfg.steps = n;
            }
            let (model, loss) =
                spdlab::model::train_target(&spec, &cfg, &candle_core::Device::Cpu, |s, l| {
                    if s % 1000 == 0 || (s % 100 == 0 && spec.is_sequence()) {
                        eprintln!("step {s}: loss {l:.5}");
                    }
                })?;
            spdlab::io::target_file::save_target(&model, &out)?;
            eprintln!("final loss {loss:.5}; saved {}", out.display());
            if let spdlab::model::TargetSpec::Tms { n_features, .. } = spec {
                let x = candle_core::Tensor::eye(
                    n_features,
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )?;
                let y = model.forward(&(x * 0.75)?)?.to_vec2::<f32>()?;
                let diag: Vec<String> =
                    (0..n_features).map(|i| format!("{:.3}", y[i][i])).collect();
                eprintln!("outputs on 0.75·e_i: {}", diag.join(" "));
            }
            if let spdlab::model::TargetSpec::Ih(d) = spec {
                let acc = spdlab::model::induction_accuracy(&model, 8192, seed ^ 0xacc)?;
                eprintln!(
                    "induction accuracy on 8192 generated sequences: {acc:.4} (chance {:.4})",
                    1.0 / d.vocab_size as f64
                );
            }
            Ok(())
        }
    }
}

/// `train-target --preset tiny-lm`: the language's tokenizer, then the model; writes
/// `OUT/tokenizer.json`, `OUT/tiny-lm.safetensors`, `OUT/model_config.yaml` and
/// `OUT/accuracy.json` (each rule's accuracy on held-out stories).
/// Prepares the folder `out` for `files` (paths inside it; an existing one is refused
/// unless `force`) and returns the writer of one of them (atomic, errors naming the file).
fn output_folder(
    out: &std::path::Path,
    files: &[&str],
    force: bool,
) -> anyhow::Result<impl Fn(&str, &[u8]) -> anyhow::Result<()>> {
    if out.exists() && !out.is_dir() {
        anyhow::bail!("{}: --out is a folder", out.display());
    }
    if !force && let Some(f) = files.iter().map(|f| out.join(f)).find(|p| p.exists()) {
        anyhow::bail!("{}: exists (add --force to replace it)", f.display());
    }
    for f in files {
        let dir = out.join(f);
        let dir = dir.parent().unwrap_or(out);
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
    }
    let out = out.to_path_buf();
    Ok(move |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let p = out.join(name);
        spdlab::io::atomic::write_atomic(&p, bytes)
            .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", p.display()))
    })
}

/// The tiny-lm target, tokenizer and text laid out as goodfire-ai/spd reads an `spd.pretrain`
/// run and a local dataset (see `README.txt` written with them).
fn export_tiny_lm_reference(
    out: &std::path::Path,
    stories: usize,
    force: bool,
) -> anyhow::Result<()> {
    use spdlab::tinylm;
    let write = output_folder(
        out,
        &[
            "target/model_config.yaml",
            "target/final_config.yaml",
            "target/model.safetensors",
            "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json",
            "data/train.jsonl",
            "data/test.jsonl",
            "README.txt",
        ],
        force,
    )?;
    let tok = tinylm::tokenizer()?;
    let mut cfg = tinylm::model_config(tok.vocab_size());
    // The reference's config wants an integer rotary_dim (it rotates the whole head anyway).
    cfg.rotary_dim.get_or_insert(cfg.n_embd / cfg.n_head);
    write(
        "target/model_config.yaml",
        serde_yaml_ng::to_string(&cfg)?.as_bytes(),
    )?;
    // PretrainRunInfo.from_path asserts that the run folder has a final_config.yaml.
    write(
        "target/final_config.yaml",
        b"# exported by spdlab export-reference (no pretraining config: trained by spdlab)\n{}\n",
    )?;
    let weights = spdlab::assets::target_bytes("tiny-lm").expect("tiny-lm ships its target");
    write("target/model.safetensors", weights)?;
    write(
        "tokenizer/tokenizer.json",
        spdlab::assets::tiny_lm_tokenizer(),
    )?;
    let tok_cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tinylm::EOS,
        "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.block_size,
    });
    write(
        "tokenizer/tokenizer_config.json",
        serde_json::to_string_pretty(&tok_cfg)?.as_bytes(),
    )?;
    let jsonl = |docs: Vec<tinylm::Doc>| -> anyhow::Result<Vec<u8>> {
        let mut b = vec![];
        for d in docs {
            serde_json::to_writer(&mut b, &serde_json::json!({ "story": d.text() }))?;
            b.push(b'\n');
        }
        Ok(b)
    };
    write(
        "data/train.jsonl",
        &jsonl(tinylm::generate(tinylm::SPD_SEED, stories))?,
    )?;
    write(
        "data/test.jsonl",
        &jsonl(tinylm::generate(tinylm::HELD_OUT_SEED, 2000))?,
    )?;
    let readme = format!(
        "The tiny-lm target of spdlab, laid out for goodfire-ai/spd (spd.pretrain run + local data).\n\
         \n\
         target/model.safetensors holds the weights under the reference's parameter names\n\
         (LlamaSimpleMLP, target/model_config.yaml). The reference loads a torch checkpoint, so\n\
         convert once (rotary buffers are rebuilt by the model itself):\n\
         \n\
         \x20 python -c \"import torch, yaml, safetensors.torch as st; \\\n\
         \x20 from spd.pretrain.models.llama_simple_mlp import LlamaSimpleMLP, LlamaSimpleMLPConfig; \\\n\
         \x20 m = LlamaSimpleMLP(LlamaSimpleMLPConfig(**yaml.safe_load(open('target/model_config.yaml')))); \\\n\
         \x20 m.load_state_dict(st.load_file('target/model.safetensors'), strict=False); \\\n\
         \x20 import os; os.makedirs('target/checkpoints', exist_ok=True); \\\n\
         \x20 torch.save(m.state_dict(), 'target/checkpoints/model.pt')\"\n\
         \n\
         Then, in an SPD config run from this folder (the reference resolves these against the\n\
         working directory):\n\
         \x20 pretrained_model_class: spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP\n\
         \x20 pretrained_model_name: target/checkpoints/model.pt\n\
         \x20 tokenizer_name: tokenizer\n\
         \x20 task_config: {{task_name: lm, dataset_name: data, column_name: story, max_seq_len: 64,\n\
         \x20               train_data_split: train, eval_data_split: test}}\n\
         \n\
         data/train.jsonl: {stories} stories of seed {} (the text spdlab's tiny-lm preset trains on);\n\
         data/test.jsonl: 2,000 held-out stories of seed {}.\n",
        tinylm::SPD_SEED,
        tinylm::HELD_OUT_SEED,
    );
    write("README.txt", readme.as_bytes())?;
    eprintln!(
        "wrote {} (target, tokenizer, {stories} + 2000 stories)",
        out.display()
    );
    Ok(())
}

fn train_tiny_lm(
    seed: u64,
    steps: Option<usize>,
    out: &std::path::Path,
    force: bool,
) -> anyhow::Result<()> {
    use spdlab::tinylm;
    let write = output_folder(
        out,
        &[
            "tokenizer.json",
            "tiny-lm.safetensors",
            "model_config.yaml",
            "accuracy.json",
        ],
        force,
    )?;
    let t0 = Instant::now();
    let docs = tinylm::generate(tinylm::TRAIN_SEED ^ seed, 20_000);
    let json = tinylm::train_tokenizer(&docs)?;
    write("tokenizer.json", json.as_bytes())?;
    let tok = spdlab::text::TextTokenizer::from_json(&json, "trained tokenizer")?;
    eprintln!(
        "tokenizer: {} tokens, every one of the {} words one token ({:.1} s)",
        tok.vocab_size(),
        tinylm::vocabulary().len(),
        t0.elapsed().as_secs_f64()
    );
    let cfg = tinylm::model_config(tok.vocab_size());
    let mut recipe = tinylm::TrainRecipe {
        seed,
        ..Default::default()
    };
    if let Some(n) = steps {
        recipe.steps = n;
    }
    let dev = candle_core::Device::Cpu;
    let (named, loss) = tinylm::train_target(&tok, &cfg, &recipe, &dev, |s, l| {
        eprintln!(
            "step {s}: loss {l:.4} ({:.0} s)",
            t0.elapsed().as_secs_f64()
        );
    })?;
    let spec = spdlab::model::TargetSpec::Lm {
        model: cfg.clone(),
        seq_len: cfg.block_size,
    };
    let model = spdlab::model::TargetModel::new(spec, named, &dev)?;
    write(
        "tiny-lm.safetensors",
        &spdlab::io::target_file::target_to_safetensors_bytes(&model)?,
    )?;
    write(
        "model_config.yaml",
        serde_yaml_ng::to_string(&cfg)?.as_bytes(),
    )?;
    let acc = tinylm::rule_accuracy(&tok, 2000, cfg.block_size, &dev, |x| Ok(model.forward(x)?))?;
    let report = serde_json::json!({
        "seed": seed,
        "steps": recipe.steps,
        "final_loss": loss,
        "held_out_stories": 2000,
        "accuracy": acc,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    write(
        "accuracy.json",
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    eprintln!(
        "final loss {loss:.4}; held-out accuracy: day after {:.4} ({} positions), copy {:.4} ({}), counting {:.4} ({}); CE {:.4} nats/token; saved {}",
        acc.day_after,
        acc.n[0],
        acc.copy,
        acc.n[1],
        acc.count,
        acc.n[2],
        acc.ce,
        out.display()
    );
    Ok(())
}

/// The output lock of a `--save` that stores a result in a copy of FILE: saving into FILE
/// itself is the documented in-place update; any other existing file needs --force.
fn save_lock(
    save: Option<&std::path::Path>,
    file: &std::path::Path,
    force: bool,
) -> anyhow::Result<Option<spdlab::io::output::Output>> {
    let Some(out) = save else {
        return Ok(None);
    };
    let in_place =
        spdlab::io::output::same_file(out, file) && !spdlab::io::reference::is_reference_run(file);
    let replace = if force || in_place {
        Replace::Allowed
    } else {
        Replace::Never
    };
    let inputs: Vec<&std::path::Path> = if in_place { vec![] } else { vec![file] };
    Ok(Some(spdlab::io::output::prepare(out, &inputs, replace)?))
}

/// `--view` help, from the app's view registry.
fn view_help() -> String {
    format!(
        "Open this view first: {}",
        spdlab::app::view_names().join(", ")
    )
}

fn recovery_path(out: &std::path::Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".recovery");
    PathBuf::from(s)
}

fn progress_bar(len: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} | {msg} | ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
