//! Train a LoRA adapter with two library crates alone (pipeline-model and
//! pipeline-train; no recipe, no cache):
//!
//!     scripts/fetch-models.sh && cargo run --release --example train_lora
//!
//! Ten steps on the real Gemma 3 270M, then the adapter in PEFT's layout
//! (`adapter_model.safetensors` + `adapter_config.json`) in a scratch dir.

use pipeline_model::ModelFiles;
use pipeline_train::{TokenizedSplit, TrainConfig, Trainer};

fn main() -> anyhow::Result<()> {
    let files = ModelFiles::from_dir("google/gemma-3-270m", "models/gemma-3-270m".as_ref())?;
    let model = pipeline_model::load(&files, &candle_core::Device::Cpu, 512)?;
    let tokenizer = tokenizers::Tokenizer::from_file(files.tokenizer_json()?).map_err(anyhow::Error::msg)?;
    let qa = [("Which fish suit beginners?", "Guppies and platies."), ("How often change the water?", "25 % weekly.")];
    let examples = qa.iter().enumerate().map(|(i, (q, a))| {
        let text = format!("<bos><start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n");
        let prompt = tokenizer.encode(text, false).expect("tokenizes").get_ids().to_vec();
        let answer = tokenizer.encode(format!("{a}<end_of_turn>"), false).expect("tokenizes").get_ids().to_vec();
        let mask = [vec![0; prompt.len()], vec![1; answer.len()]].concat();
        (i.to_string(), [prompt, answer].concat(), mask)
    });
    let config = TrainConfig { max_steps: Some(10), learning_rate: 1e-3, ..TrainConfig::default() };
    let mut trainer = Trainer::new(model, TokenizedSplit::from_examples(examples), None, config)?;
    let summary = trainer.run(None, &mut ())?;
    let out = std::env::temp_dir().join(format!("pipeline-lora-{}", std::process::id()));
    trainer.save_adapter(&out, "google/gemma-3-270m")?;

    let first = trainer.state().log.first().map_or(f64::NAN, |r| r.loss);
    println!(
        "loss {first:.3} → {:.3} in {} steps; adapter in {}",
        summary.train_loss_last10,
        summary.steps,
        out.display()
    );
    assert!(summary.train_loss_last10 < first, "training did not lower the loss");
    Ok(())
}
