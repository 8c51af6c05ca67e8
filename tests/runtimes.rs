//! What we ship, run by the programs that serve it: llama.cpp (built from
//! the llama-cpp-python sdist by `scripts/build-llama-cpp.sh`) tokenizes,
//! scores and serves our GGUF files, and transformers loads our merged
//! models. A format reader is not a client: these tests compare behaviour
//! (token ids, perplexity, rendered prompts, greedy tokens), not fields.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Project, Server, models_dir, python_check};
use pipeline::stages::quantize::{QuantType, write_gguf};
use serde_json::{Value, json};

/// The repository's root (recipes are run from there).
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `recipe` up to its `tokens` stage in `p`; returns, per
/// conversation of `split`, the text format-chat rendered and the ids the
/// tokenize stage wrote (what training reads).
fn trained_tokens(p: &Project, recipe: &Path, split: &str, set: &[&str]) -> Vec<(String, Vec<u32>)> {
    let recipe = recipe.to_str().unwrap();
    let mut args = vec!["run", recipe, "--until", "tokens"];
    let mut show = vec!["show", recipe];
    for s in set {
        args.extend(["--set", s]);
        show.extend(["--set", s]);
    }
    p.ok(&args);
    let dir = |stage: &str| {
        let out = p.run(&[show.as_slice(), &[stage]].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    };
    let texts: Vec<String> = std::fs::read_to_string(dir("chat").join(format!("conversations/{split}.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["text"].as_str().unwrap().to_string())
        .collect();
    let bytes = std::fs::read(dir("tokens").join(format!("tokens/{split}.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> =
        st.tensor("input_ids").unwrap().data().chunks(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect();
    let offsets: Vec<i64> =
        st.tensor("offsets").unwrap().data().chunks(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(offsets.len(), texts.len() + 1, "one row of ids per conversation");
    texts.into_iter().zip(offsets.windows(2)).map(|(t, w)| (t, ids[w[0] as usize..w[1] as usize].to_vec())).collect()
}

/// `llama-tokenize` on `text` with the vocabulary of `gguf`, as a server
/// reading a raw prompt does (special tokens parsed, no BOS added: our
/// templates write their own).
fn llama_tokenize(bin: &Path, gguf: &Path, text: &str, scratch: &Path) -> Vec<u32> {
    let file = scratch.join("prompt.txt");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(bin)
        .args(["-m", gguf.to_str().unwrap(), "-f", file.to_str().unwrap()])
        .args(["--ids", "--no-bos", "--no-escape", "--log-disable"])
        .output()
        .unwrap();
    assert!(out.status.success(), "llama-tokenize failed: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(printed.trim()).unwrap_or_else(|e| panic!("llama-tokenize printed {printed:?}: {e}"))
}

/// Every conversation: llama.cpp's ids on our GGUF equal the trained ids.
fn assert_same_tokens(bin: &Path, gguf: &Path, rows: &[(String, Vec<u32>)], what: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let mut mismatches = Vec::new();
    for (i, (text, ours)) in rows.iter().enumerate() {
        let theirs = llama_tokenize(bin, gguf, text, scratch.path());
        if &theirs != ours {
            let at = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
            mismatches.push(format!(
                "row {i}: first difference at token {at} (ours {:?}, llama.cpp {:?})",
                ours.get(at),
                theirs.get(at)
            ));
        }
    }
    let n: usize = rows.iter().map(|(_, ids)| ids.len()).sum();
    eprintln!(
        "{what}: llama-tokenize matches the trained ids on {}/{} rows ({n} tokens)",
        rows.len() - mismatches.len(),
        rows.len()
    );
    assert!(
        mismatches.is_empty(),
        "{what}: {} of {} rows tokenize differently:\n{}",
        mismatches.len(),
        rows.len(),
        mismatches.join("\n")
    );
}

#[test]
fn llama_cpp_tokenizes_every_validation_conversation_as_gemma_training_did() {
    let (Some(models), Some(bin)) = (models_dir(), common::llama_cpp("llama-tokenize")) else { return };
    let p = Project::new();
    // Untruncated (training keeps the last max_len tokens of the same ids).
    let rows =
        trained_tokens(&p, &repo().join("recipes/quickstart.toml"), "validation", &["stages.tokens.max_len=32768"]);
    assert_eq!(rows.len(), 60, "the validation split");
    let gguf = p.path("gemma.q8_0.gguf");
    write_gguf(&pipeline::model_source::from_path(&models.join("gemma-3-270m")).unwrap(), QuantType::Q8_0, "t", &gguf)
        .unwrap();
    assert_same_tokens(&bin, &gguf, &rows, "gemma3 (tool-use validation)");
}

/// Gemma 3 as a GGUF alone (no tokenizer.json beside it): the tokenizer
/// built from its SentencePiece metadata has exactly the vocabulary and
/// merges of the model's own tokenizer.json, and gives the trained ids on
/// every validation conversation, as llama.cpp does on the same file.
#[test]
fn a_sentencepiece_gguf_alone_brings_gemmas_own_tokenizer() {
    let (Some(models), Some(bin)) = (models_dir(), common::llama_cpp("llama-tokenize")) else { return };
    let p = Project::new();
    let rows =
        trained_tokens(&p, &repo().join("recipes/quickstart.toml"), "validation", &["stages.tokens.max_len=32768"]);
    assert_eq!(rows.len(), 60, "the validation split");
    let gguf = models.join("gemma-3-270m/gemma-3-270m-q4_k_m.gguf");
    std::fs::create_dir_all(p.path("alone")).unwrap();
    std::os::unix::fs::symlink(&gguf, p.path("alone/gemma.gguf")).unwrap();
    let alone = pipeline::model_source::from_path(&p.path("alone")).unwrap();
    let built = alone.tokenizer_json().unwrap();
    assert!(!built.starts_with(models.join("gemma-3-270m")), "built from the GGUF: {}", built.display());

    let json = |path: &Path| serde_json::from_slice::<Value>(&std::fs::read(path).unwrap()).unwrap();
    let (ours, real) = (json(built), json(&models.join("gemma-3-270m/tokenizer.json")));
    assert!(ours["model"]["vocab"] == real["model"]["vocab"], "the vocabulary of tokenizer.json");
    let merges = |t: &Value| t["model"]["merges"].as_array().unwrap().clone();
    let (m_ours, m_real) = (merges(&ours), merges(&real));
    let first = m_ours.iter().zip(&m_real).position(|(a, b)| a != b);
    assert!(
        m_ours.len() == m_real.len() && first.is_none(),
        "merges: {} built, {} in tokenizer.json, first difference at {first:?}",
        m_ours.len(),
        m_real.len()
    );

    let tok = tokenizers::Tokenizer::from_file(built).unwrap();
    let differ: Vec<usize> = rows
        .iter()
        .enumerate()
        .filter(|(_, (text, ids))| tok.encode(text.as_str(), false).unwrap().get_ids() != ids.as_slice())
        .map(|(i, _)| i)
        .collect();
    let n: usize = rows.iter().map(|(_, ids)| ids.len()).sum();
    eprintln!(
        "gemma3 (its GGUF alone): the built tokenizer gives the trained ids on {}/60 rows ({n} tokens)",
        60 - differ.len()
    );
    assert!(differ.is_empty(), "rows tokenized differently by the tokenizer built from the GGUF: {differ:?}");
    assert_same_tokens(&bin, &gguf, &rows, "gemma3 (the original GGUF, in llama.cpp)");
}

/// SmolLM2-135M-Instruct comes as a GGUF alone: the tokenizer built from
/// its metadata gives llama.cpp's ids on every validation conversation
/// (Gemma-rendered text, and the same text in SmolLM2's ChatML turns, whose
/// special tokens are matched whole), on the original file and on the GGUF
/// we write from it, which keeps its `smollm` pre-tokenizer.
#[test]
fn a_gguf_alone_brings_its_tokenizer_and_smollm2_tokenizes_as_llama_cpp_does() {
    let (Some(models), Some(bin)) = (models_dir(), common::llama_cpp("llama-tokenize")) else { return };
    let dir = models.join("smollm2-135m-instruct");
    let original = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !original.is_file() {
        return common::missing("SmolLM2-135M-Instruct is not provisioned", "run scripts/fetch-models.sh");
    }
    let p = Project::new();
    let base = pipeline::model_source::from_path(&dir).unwrap();
    let tok = tokenizers::Tokenizer::from_file(base.tokenizer_json().unwrap()).unwrap();
    let template = pipeline_infer::chat::ChatTemplate::for_model(&base, None, Path::new(".")).unwrap();
    let texts: Vec<String> = trained_tokens(&p, &repo().join("recipes/quickstart.toml"), "validation", &[])
        .into_iter()
        .map(|(text, _)| text)
        .collect();
    let mut rows = Vec::new();
    for text in texts {
        let chat = template.render(&[pipeline_infer::chat::Message::new("user", &text)], None, true).unwrap();
        assert!(chat.starts_with("<|im_start|>system\n"), "the GGUF's own ChatML template: {chat}");
        for t in [text, chat] {
            let ids = tok.encode(t.as_str(), false).unwrap().get_ids().to_vec();
            rows.push((t, ids));
        }
    }
    assert_same_tokens(&bin, &original, &rows, "smollm2 (its GGUF's tokenizer)");
    let ours = p.path("smollm2.q8_0.gguf");
    write_gguf(&base, QuantType::Q8_0, "t", &ours).unwrap();
    let mut f = std::fs::File::open(&ours).unwrap();
    let md = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap().metadata;
    let s = |k: &str| md[k].to_string().unwrap().clone();
    assert_eq!((s("general.architecture"), s("tokenizer.ggml.pre")), ("llama".into(), "smollm".into()));
    assert_same_tokens(&bin, &ours, &rows, "smollm2 (our Q8_0)");
}

#[test]
fn llama_cpp_tokenizes_the_qwen3_function_calling_data_as_training_did() {
    let (Some(models), Some(bin)) = (models_dir(), common::llama_cpp("llama-tokenize")) else { return };
    let p = Project::new();
    let tiny = p.path("tiny-qwen3");
    pipeline_model::testing::TinyQwen::new(pipeline_model::qwen::Variant::Qwen3, 151_936)
        .write(&tiny, &models.join("qwen3-tokenizer"), 3)
        .unwrap();
    let base = format!("model.base={}", tiny.display());
    let recipe = repo().join("recipes/qwen3-0.6b-function-calling.toml");
    let set = [base.as_str(), "stages.tokens.max_len=32768"];
    let mut rows = trained_tokens(&p, &recipe, "train", &set);
    rows.extend(trained_tokens(&p, &recipe, "validation", &set));
    assert!(rows.len() >= 40, "the whole data file ({} rows)", rows.len());
    let gguf = p.path("qwen3.q8_0.gguf");
    write_gguf(&pipeline::model_source::from_path(&tiny).unwrap(), QuantType::Q8_0, "t", &gguf).unwrap();
    assert_same_tokens(&bin, &gguf, &rows, "qwen3 (function-calling data)");
}

/// Llama 3.1+ keeps its scaled rotary frequencies (`rope_type = "llama3"`)
/// in a GGUF as per-frequency factors. A Llama 3.2-shaped checkpoint (the
/// real Llama 3.2 tokenizer and chat template, Llama 3's scaling) written
/// by us and by llama.cpp's own converter (`convert_hf_to_gguf.py`, from
/// the source the tests' llama.cpp is built from) holds the same metadata
/// and tensors, the factors within f32 rounding; read back, ours is the
/// checkpoint's model (the same logits) with the same scaling.
#[test]
fn a_llama3_gguf_is_what_llama_cpps_converter_writes() {
    use candle_core::quantized::gguf_file::Content;
    let (Some(models), Some(python), Some(converter)) =
        (models_dir(), common::torch_python(), common::llama_cpp_converter())
    else {
        return;
    };
    let p = Project::new();
    let dir = p.path("llama3");
    let mut tiny = pipeline_model::testing::TinyLlama::new(128_256);
    tiny.rope_theta = 500_000.0;
    tiny.rope_scaling = Some(json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}));
    tiny.write(&dir, &models.join("llama3.2-tokenizer"), 5).unwrap();
    let theirs = p.path("theirs.gguf");
    let out = Command::new(&python)
        .arg(&converter)
        .arg(&dir)
        .args(["--outtype", "f32", "--outfile", theirs.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "convert_hf_to_gguf.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let ours = p.path("ours.gguf");
    let model = pipeline::model_source::from_path(&dir).unwrap();
    write_gguf(&model, QuantType::F32, "t", &ours).unwrap();

    let read = |path: &Path| {
        let mut f = std::fs::File::open(path).unwrap();
        let c = Content::read(&mut f).unwrap();
        (f, c)
    };
    let ((mut fo, co), (mut ft, ct)) = (read(&ours), read(&theirs));
    // Every hyper-parameter and tokenizer key the converter writes, with
    // its value (general.* names the file, not the model).
    let mut differ = Vec::new();
    let mut keys: Vec<&String> = ct.metadata.keys().filter(|k| !k.starts_with("general.")).collect();
    keys.sort();
    for k in &keys {
        match co.metadata.get(*k) {
            None => differ.push(format!("{k}: missing")),
            Some(v) if format!("{v:?}") != format!("{:?}", ct.metadata[*k]) => differ.push(format!(
                "{k}: ours {:.120}, theirs {:.120}",
                format!("{v:?}"),
                format!("{:?}", ct.metadata[*k])
            )),
            Some(_) => {}
        }
    }
    assert!(differ.is_empty(), "metadata differs from llama.cpp's converter:\n{}", differ.join("\n"));
    // The same tensors in the same order, the weights bit for bit.
    let names = |c: &Content| {
        let mut v: Vec<(String, u64)> = c.tensor_infos.iter().map(|(n, i)| (n.clone(), i.offset)).collect();
        v.sort_by_key(|(_, offset)| *offset);
        v.into_iter().map(|(n, _)| n).collect::<Vec<_>>()
    };
    assert_eq!(names(&co), names(&ct), "tensor order");
    let dev = candle_core::Device::Cpu;
    for name in names(&ct) {
        let a: Vec<f32> = co
            .tensor(&mut fo, &name, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = ct
            .tensor(&mut ft, &name, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let tolerance = if name == "rope_freqs.weight" { 1e-6 } else { 0.0 };
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1e-30)).fold(0f32, f32::max);
        assert!(a.len() == b.len() && worst <= tolerance, "{name}: relative difference {worst}");
    }
    assert_eq!(names(&ct)[0], "rope_freqs.weight");

    // Read back: the scaling, and the checkpoint's logits.
    let from_gguf = pipeline::model_source::from_path(&ours).unwrap();
    let arch = pipeline::stages::quantize::model_arch(&from_gguf).unwrap();
    let scaling = arch.hf_config()["rope_parameters"].clone();
    assert_eq!((scaling["rope_type"].as_str(), scaling["factor"].as_f64()), (Some("llama3"), Some(32.0)), "{scaling}");
    let ids = [128_000u32, 791, 6864, 315, 9822, 374, 12366, 13];
    let logits = |m: &pipeline_model::ModelFiles| -> Vec<f32> {
        let lm = pipeline_model::load(m, &dev, 64).unwrap();
        lm.last_logits(&ids).unwrap().to_vec1().unwrap()
    };
    let (a, b) = (logits(&model), logits(&from_gguf));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    eprintln!(
        "llama3 GGUF: {} metadata keys and {} tensors as llama.cpp's converter writes them; read back, logits within {worst:.2e}",
        keys.len(),
        names(&ct).len()
    );
    assert!(worst < 1e-4, "logits of the GGUF read back differ by {worst}");
}

/// `llama-perplexity` of a GGUF file on `../shared/reference/ppl_text.txt`.
fn llama_perplexity(bin: &Path, gguf: &Path) -> f64 {
    let text = common::shared_dir().join("reference/ppl_text.txt");
    let out = Command::new(bin)
        .args(["-m", gguf.to_str().unwrap(), "-f", text.to_str().unwrap(), "-c", "256", "-t", "2", "-b", "256"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "llama-perplexity failed on {}:\n{log}", gguf.display());
    let estimate = log
        .lines()
        .find_map(|l| l.split("Final estimate: PPL = ").nth(1))
        .unwrap_or_else(|| panic!("no estimate:\n{log}"));
    estimate.split_whitespace().next().unwrap().parse().unwrap()
}

/// The tensors of two GGUF files whose type or data differ.
fn differing_tensors(a: &Path, b: &Path) -> Vec<String> {
    use candle_core::quantized::gguf_file::Content;
    let open = |p: &Path| {
        let mut f = std::fs::File::open(p).unwrap();
        let c = Content::read(&mut f).unwrap();
        (f, c)
    };
    let ((mut fa, ca), (mut fb, cb)) = (open(a), open(b));
    let mut names: Vec<&String> = ca.tensor_infos.keys().collect();
    names.sort();
    let mut differ = Vec::new();
    for name in names {
        let dev = candle_core::Device::Cpu;
        let ta = ca.tensor(&mut fa, name, &dev).unwrap();
        let same = cb.tensor_infos.contains_key(name.as_str()) && {
            let tb = cb.tensor(&mut fb, name, &dev).unwrap();
            ta.dtype() == tb.dtype() && ta.data().unwrap() == tb.data().unwrap()
        };
        if !same {
            differ.push(name.clone());
        }
    }
    differ
}

/// SmolLM2 (Llama, a Q4_1 GGUF with q/k rows in llama.cpp's rotary
/// order) read and written back: our f32 file holds exactly the tensors
/// llama-quantize dequantizes the original to, our f16 scores within 0.1 %
/// of it in llama.cpp, and our quantized files are llama-quantize's blocks.
#[test]
fn smollm2_written_back_is_the_original_and_quantizes_as_llama_quantize_does() {
    let (Some(models), Some(ppl), Some(quantize)) =
        (models_dir(), common::llama_cpp("llama-perplexity"), common::llama_cpp("llama-quantize"))
    else {
        return;
    };
    let original = models.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !original.is_file() {
        return common::missing("SmolLM2-135M-Instruct is not provisioned", "run scripts/fetch-models.sh");
    }
    let base = pipeline::model_source::from_path(&original).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let llama_quantize = |from: &Path, to: &Path, ty: &str| {
        let out = Command::new(&quantize).arg("--allow-requantize").args([from, to]).arg(ty).output().unwrap();
        assert!(out.status.success(), "llama-quantize {ty} failed: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (ours_f32, theirs_f32) = (dir.path().join("ours.f32.gguf"), dir.path().join("theirs.f32.gguf"));
    write_gguf(&base, QuantType::F32, "t", &ours_f32).unwrap();
    llama_quantize(&original, &theirs_f32, "F32");
    let differ = differing_tensors(&ours_f32, &theirs_f32);
    assert!(differ.is_empty(), "tensors that differ from the original dequantized by llama.cpp: {differ:?}");
    let reference = llama_perplexity(&ppl, &theirs_f32);
    let ours_f16 = dir.path().join("ours.f16.gguf");
    write_gguf(&base, QuantType::F16, "t", &ours_f16).unwrap();
    let f16 = llama_perplexity(&ppl, &ours_f16);
    eprintln!("SmolLM2 perplexity (llama.cpp, -c 256): the original in f32 {reference:.4}, our f16 {f16:.4}");
    assert!((f16 / reference - 1.0).abs() < 0.001, "our f16 scores {f16}, the original {reference}");
    // Every file carries the same vocabulary, `smollm` pre-tokenizer and
    // special-token settings (so each tokenizes as the Q8_0 file that
    // `a_gguf_alone_brings_its_tokenizer…` runs through llama-tokenize).
    let tokenizer_md = |path: &Path| {
        let mut f = std::fs::File::open(path).unwrap();
        let md = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap().metadata;
        let mut v: Vec<(String, String)> = md
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), format!("{v:?}")))
            .collect();
        v.sort();
        v
    };
    let vocabulary = tokenizer_md(&ours_f32);
    assert!(
        vocabulary.iter().any(|(k, v)| k == "tokenizer.ggml.pre" && v.contains("\"smollm\"")),
        "{:?}",
        &vocabulary[..3]
    );
    assert!(tokenizer_md(&ours_f16) == vocabulary, "f16: the tokenizer differs from the f32 file's");
    for (ty, name) in [(QuantType::Q8_0, "Q8_0"), (QuantType::Q4KM, "Q4_K_M"), (QuantType::Q4_1, "Q4_1")] {
        let (ours, theirs) =
            (dir.path().join(format!("ours.{name}.gguf")), dir.path().join(format!("theirs.{name}.gguf")));
        write_gguf(&base, ty, "t", &ours).unwrap();
        llama_quantize(&ours_f32, &theirs, name);
        let differ = differing_tensors(&ours, &theirs);
        assert!(differ.is_empty(), "{name}: tensors whose blocks differ from llama-quantize's: {differ:?}");
        assert!(tokenizer_md(&ours) == vocabulary, "{name}: the tokenizer differs from the f32 file's");
    }
}

/// Every type we write: perplexity in llama.cpp within 0.5 % of the
/// reference (f16/bf16: the f32 file; quantized types: llama-quantize's
/// file made from our f32 file), and for quantized types the very blocks
/// llama-quantize writes (same per-tensor types, same encoders).
#[test]
fn every_gguf_type_we_write_scores_like_llama_quantizes_file_of_that_type() {
    let (Some(models), Some(ppl), Some(quantize)) =
        (models_dir(), common::llama_cpp("llama-perplexity"), common::llama_cpp("llama-quantize"))
    else {
        return;
    };
    let base = pipeline::model_source::from_path(&models.join("gemma-3-270m")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f32_file = dir.path().join("f32.gguf");
    write_gguf(&base, QuantType::F32, "t", &f32_file).unwrap();
    let reference = llama_perplexity(&ppl, &f32_file);
    eprintln!("perplexity (llama.cpp, -c 256): f32 {reference:.4}");
    let types = [
        (QuantType::F16, "F16"),
        (QuantType::Bf16, "BF16"),
        (QuantType::Q8_0, "Q8_0"),
        (QuantType::Q6K, "Q6_K"),
        (QuantType::Q5KM, "Q5_K_M"),
        (QuantType::Q4KM, "Q4_K_M"),
        (QuantType::Q4_0, "Q4_0"),
    ];
    let mut failures = Vec::new();
    for (ty, name) in types {
        let ours = dir.path().join(format!("ours.{}.gguf", ty.name()));
        write_gguf(&base, ty, "t", &ours).unwrap();
        let ours_ppl = llama_perplexity(&ppl, &ours);
        // f16 and bf16 are compared with the f32 file; quantized types with
        // llama-quantize's file of the same type, made from the same f32.
        let theirs_ppl = if matches!(ty, QuantType::F16 | QuantType::Bf16) {
            reference
        } else {
            let theirs = dir.path().join(format!("theirs.{}.gguf", ty.name()));
            let out =
                Command::new(&quantize).args([f32_file.as_os_str(), theirs.as_os_str()]).arg(name).output().unwrap();
            assert!(out.status.success(), "llama-quantize {name} failed: {}", String::from_utf8_lossy(&out.stderr));
            let t = llama_perplexity(&ppl, &theirs);
            let differ = differing_tensors(&ours, &theirs);
            assert!(differ.is_empty(), "{name}: tensors whose blocks differ from llama-quantize's: {differ:?}");
            std::fs::remove_file(&theirs).unwrap();
            t
        };
        std::fs::remove_file(&ours).unwrap();
        let rel = (ours_ppl - theirs_ppl).abs() / theirs_ppl;
        eprintln!(
            "perplexity {name}: ours {ours_ppl:.4}, reference {theirs_ppl:.4} ({:+.3} %)",
            100.0 * (ours_ppl / theirs_ppl - 1.0)
        );
        if rel > 0.005 {
            failures.push(format!("{name}: ours {ours_ppl:.4} vs {theirs_ppl:.4}"));
        }
    }
    assert!(failures.is_empty(), "perplexity differs by more than 0.5 %: {failures:?}");
}

/// A rank-2 adapter with random A and B on the q and down projections of
/// every layer of `base` (enough to make a merge change the weights).
fn random_adapter(base: &pipeline_model::ModelFiles, dir: &Path, std: f32) {
    random_adapter_on(base, dir, std, &["q_proj", "down_proj"]);
}

/// A rank-2 adapter with random A and B on the `targets` of every layer.
fn random_adapter_on(base: &pipeline_model::ModelFiles, dir: &Path, std: f32, targets: &[&str]) {
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut m = pipeline_model::load(base, &Device::Cpu, 64).unwrap();
    let mut tensors = pipeline_model::adapter::LoraTensors::new();
    for (name, lin) in m.linears_mut() {
        if !targets.iter().any(|t| name.ends_with(t)) {
            continue;
        }
        // Seeded, so that a failure reproduces: uniform on [-√3·std, √3·std).
        let mut uniform = |shape: (usize, usize)| {
            let half = 3f32.sqrt() * std;
            let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-half..half)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let a = uniform((2, lin.in_features()));
        let b = uniform((lin.out_features(), 2));
        tensors.insert(name, (a, b));
    }
    let targets = targets.iter().map(|t| t.to_string()).collect();
    let config = pipeline_model::adapter::AdapterConfig::lora(&base.source, 2, 4.0, 0.0, targets, false);
    std::fs::create_dir_all(dir).unwrap();
    pipeline_model::adapter::save(dir, &config, &tensors, None).unwrap();
}

/// transformers (5.x) loads a merged directory's config and tokenizer as a
/// user would, and renders conversations with its chat template exactly as
/// format-chat does. (Without torch installed it cannot load the weights;
/// `merge.rs` checks those with Hugging Face's safetensors reader.)
#[test]
fn transformers_loads_merged_models_and_renders_their_template_as_we_do() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    let tiny = |v| {
        let dir = p.path(&format!("{v:?}"));
        pipeline_model::testing::TinyQwen::new(v, 151_936).write(&dir, &models.join("qwen3-tokenizer"), 5).unwrap();
        dir
    };
    let bases = [
        ("gemma3 (from the GGUF)", models.join("gemma-3-270m")),
        ("qwen3", tiny(pipeline_model::qwen::Variant::Qwen3)),
        ("qwen2", tiny(pipeline_model::qwen::Variant::Qwen2)),
        ("llama (SmolLM2, its GGUF's tokenizer and template)", models.join("smollm2-135m-instruct")),
    ];
    let messages = json!([
        {"role": "system", "content": "You call tools when needed.\n  Indented  text,\ttabs."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<tool_call>\n{\n  \"tool_name\": \"calc\", \"args\": {\"x\": \"2+2\"}\n}\n</tool_call>"},
        {"role": "user", "content": "And in words?"},
    ]);
    let script = r#"
import json, sys
from transformers import AutoConfig, AutoTokenizer
d, messages = sys.argv[1], json.loads(sys.argv[2])
config = AutoConfig.from_pretrained(d)
tok = AutoTokenizer.from_pretrained(d)
rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
print(json.dumps({"model_type": config.model_type, "config": config.to_dict(), "rendered": rendered,
                  "ids": tok(rendered, add_special_tokens=False)["input_ids"]}))
"#;
    // Native tool-use conversations (tools, calls, tool results) of the
    // validation split, rendered with their tools by both.
    let native = common::native_tool_conversations(&models);
    let native_file = p.write("native.json", &serde_json::to_string(&native).unwrap());
    let tools_script = r#"
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
rows = json.load(open(sys.argv[2]))
print(json.dumps([tok.apply_chat_template(m, tools=t, tokenize=False, add_generation_prompt=True) for m, t in rows]))
"#;
    for (arch, base_dir) in bases {
        let base = pipeline::model_source::from_path(&base_dir).unwrap();
        let adapter = p.path(&format!("adapter-{}", &arch[..5]));
        random_adapter(&base, &adapter, 0.02);
        let merged = p.path(&format!("merged-{}", &arch[..5]));
        // Gemma 3's own template has no tools: the tool-use recipes train
        // Gemma with the built-in `gemma-tools`; Qwen's own has a tool block.
        let choice = arch.starts_with("gemma3").then_some("gemma-tools");
        let template = pipeline_infer::chat::ChatTemplate::for_model(&base, choice, Path::new(".")).unwrap();
        let dtype = pipeline::stages::merge::WeightDtype::Bf16;
        pipeline::stages::merge::merge(&base, "", &adapter, Some(&template), dtype, &merged).unwrap();
        let Some(out) = python_check("transformers", script, &[merged.to_str().unwrap(), &messages.to_string()]) else {
            return;
        };
        let got: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        let msgs: Vec<pipeline_infer::chat::Message> = serde_json::from_value(messages.clone()).unwrap();
        let ours = template.render(&msgs, None, true).unwrap();
        assert_eq!(got["rendered"].as_str().unwrap(), ours, "{arch}: apply_chat_template differs from format-chat");
        let tok = tokenizers::Tokenizer::from_file(merged.join("tokenizer.json")).unwrap();
        let ids: Vec<u32> = tok.encode(ours.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(got["ids"], json!(ids), "{arch}: transformers' tokenizer gives other ids");
        let config = &got["config"];
        assert_eq!(config["dtype"], "bfloat16", "{arch}: {config}");
        assert!(
            config["eos_token_id"].is_number() || config["eos_token_id"].is_array(),
            "{arch}: eos ids in config.json"
        );
        if arch.starts_with("gemma3") {
            assert_eq!(config["query_pre_attn_scalar"], 256, "{arch}");
            assert_eq!(config["rms_norm_eps"], 1e-6, "{arch}: the f32 of the GGUF, written as the config stated it");
            assert_eq!(config["rope_parameters"]["sliding_attention"]["rope_theta"], 10000.0, "{arch}");
            assert_eq!(config["bos_token_id"], 2, "{arch}");
        }
        let Some(out) =
            python_check("transformers", tools_script, &[merged.to_str().unwrap(), native_file.to_str().unwrap()])
        else {
            return;
        };
        let theirs: Vec<String> = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        let mut with_calls = 0;
        for ((messages, tools), theirs) in native.iter().zip(&theirs) {
            let msgs: Vec<pipeline_infer::chat::Message> = serde_json::from_value(messages.clone()).unwrap();
            with_calls += usize::from(msgs.iter().any(|m| m.tool_calls.is_some()));
            let ours = template.render(&msgs, Some(tools), true).unwrap();
            assert_eq!(theirs, &ours, "{arch}: apply_chat_template(tools=…) differs from ours on {msgs:?}");
        }
        assert!(with_calls >= 40, "{with_calls}");
        eprintln!(
            "transformers {arch}: config {} loads; apply_chat_template equals ours ({} tokens), and with tools on {} \
             tool-use conversations ({with_calls} with calls and results)",
            got["model_type"],
            ids.len(),
            theirs.len()
        );
    }
}

/// Per position of a sequence: the log-probability of the token that
/// follows, the likeliest token and its lead over the second likeliest.
#[derive(Debug, serde::Deserialize)]
struct Scores {
    logprob: Vec<f64>,
    argmax: Vec<u32>,
    gap: Vec<f64>,
}

/// `pipeline`'s scores of `ids` (the model's f32 forward pass over the
/// whole sequence, as training and evaluation run it).
fn our_scores(m: &dyn pipeline_model::CausalLm, ids: &[u32]) -> Scores {
    let hidden = m.hidden(ids, None).unwrap();
    let logits = m.logits(&hidden).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
    let rows: Vec<Vec<f32>> = log_probs.to_vec2().unwrap();
    let mut s = Scores { logprob: Vec::new(), argmax: Vec::new(), gap: Vec::new() };
    for (i, row) in rows.iter().enumerate() {
        if let Some(&next) = ids.get(i + 1) {
            s.logprob.push(row[next as usize] as f64);
        }
        let (mut best, mut second) = ((0usize, f32::NEG_INFINITY), f32::NEG_INFINITY);
        for (t, &v) in row.iter().enumerate() {
            if v > best.1 {
                second = best.1;
                best = (t, v);
            } else if v > second {
                second = v;
            }
        }
        s.argmax.push(best.0 as u32);
        s.gap.push((best.1 - second) as f64);
    }
    s
}

/// How far two programs' scores of the same sequences are apart: the
/// largest log-probability difference, and the positions where their
/// likeliest tokens differ although `theirs` saw no near-tie.
fn disagreement(ours: &[Scores], theirs: &[Scores], tie: f64) -> (f64, Vec<String>) {
    let (mut worst, mut parted) = (0f64, Vec::new());
    for (k, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a.logprob.len(), b.logprob.len());
        for (x, y) in a.logprob.iter().zip(&b.logprob) {
            worst = worst.max((x - y).abs());
        }
        for i in 0..a.argmax.len() {
            if a.argmax[i] != b.argmax[i] && b.gap[i] > tie {
                parted.push(format!(
                    "sequence {k} position {i}: {} vs {} (gap {:.2e})",
                    a.argmax[i], b.argmax[i], b.gap[i]
                ));
            }
        }
    }
    (worst, parted)
}

/// PyTorch runs what we ship as we ran it: transformers' Gemma 3 (the base
/// GGUF dequantized by transformers' own loader) scores sequences as our
/// forward pass does, PEFT's `PeftModel.from_pretrained` with our adapter
/// directory scores them as our model with the adapter attached does, and
/// transformers' `from_pretrained` of our merged directory agrees with both.
/// The sequences are chat prompts and a 700-token text (past Gemma 3's
/// 512-token sliding window).
#[test]
fn transformers_and_peft_score_our_adapter_and_merged_model_as_we_do() {
    let (Some(models), Some(python)) = (models_dir(), common::torch_python()) else { return };
    pytorch_scores_as_we_do(&python, &models.join("gemma-3-270m"), "gemma-3-270m-q4_k_m.gguf", Some(2));
}

/// The same for the Llama family: SmolLM2-135M-Instruct, a GGUF alone (its
/// tokenizer read from the file), q/k rows in llama.cpp's order.
#[test]
fn transformers_and_peft_score_our_smollm2_adapter_and_merged_model_as_we_do() {
    let (Some(models), Some(python)) = (models_dir(), common::torch_python()) else { return };
    let dir = models.join("smollm2-135m-instruct");
    if !dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file() {
        return common::missing("SmolLM2-135M-Instruct is not provisioned", "run scripts/fetch-models.sh");
    }
    pytorch_scores_as_we_do(&python, &dir, "SmolLM2-135M-Instruct.Q4_1.gguf", None);
}

/// Scores of the base in `base_dir` (its GGUF `gguf`), of a random adapter
/// on it and of the merged model, by transformers and PEFT against ours.
/// `bos` starts the long text.
fn pytorch_scores_as_we_do(python: &Path, base_dir: &Path, gguf: &str, bos: Option<u32>) {
    let p = Project::new();
    let base = pipeline::model_source::from_path(base_dir).unwrap();
    let adapter = p.path("adapter");
    let all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    random_adapter_on(&base, &adapter, 0.03, &all_linear);
    let merged = p.path("merged");
    let f32 = pipeline::stages::merge::WeightDtype::F32;
    pipeline::stages::merge::merge(&base, "", &adapter, None, f32, &merged).unwrap();

    let tok = tokenizers::Tokenizer::from_file(base.tokenizer_json().unwrap()).unwrap();
    let template = pipeline_infer::chat::ChatTemplate::for_model(&base, None, Path::new(".")).unwrap();
    let mut sequences: Vec<Vec<u32>> = conversations()
        .into_iter()
        .map(|m| {
            let msgs: Vec<pipeline_infer::chat::Message> = serde_json::from_value(m).unwrap();
            tok.encode(template.render(&msgs, None, true).unwrap().as_str(), false).unwrap().get_ids().to_vec()
        })
        .collect();
    let text = std::fs::read_to_string(common::shared_dir().join("reference/ppl_text.txt")).unwrap();
    let mut long: Vec<u32> = bos.into_iter().collect();
    long.extend(tok.encode(text.as_str(), false).unwrap().get_ids().iter().take(700 - long.len()));
    assert_eq!(long.len(), 700, "the text is long enough to pass the sliding window");
    sequences.push(long);
    let seq_file = p.write("sequences.json", &json!(sequences).to_string());

    let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base_dir, gguf, adapter, merged, seqs = sys.argv[1:6]
seqs = json.load(open(seqs))
torch.set_num_threads(2)

def scores(model):
    model.eval()
    out = []
    with torch.no_grad():
        for ids in seqs:
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            top = lp.topk(2, -1)
            out.append({"logprob": lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(),
                        "argmax": top.indices[:, 0].tolist(),
                        "gap": (top.values[:, 0] - top.values[:, 1]).tolist()})
    return out

base = AutoModelForCausalLM.from_pretrained(base_dir, gguf_file=gguf, dtype=torch.float32)
result = {"base": scores(base)}
result["peft"] = scores(PeftModel.from_pretrained(base, adapter))
result["merged"] = scores(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
import peft, transformers
result["versions"] = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
print(json.dumps(result))
"#;
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args([base_dir, &base_dir.join(gguf), &adapter, &merged, &seq_file])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "PyTorch could not run our files:\n{}",
        String::from_utf8_lossy(&out.stderr).lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    let report: Value = serde_json::from_slice(out.stdout.rsplit(|&b| b == b'\n').find(|l| !l.is_empty()).unwrap())
        .expect("the script prints one JSON line");
    let read = |k: &str| -> Vec<Scores> { serde_json::from_value(report[k].clone()).unwrap() };
    let (their_base, their_peft, their_merged) = (read("base"), read("peft"), read("merged"));

    let mut m = pipeline_model::load(&base, &candle_core::Device::Cpu, 1024).unwrap();
    let our_base: Vec<Scores> = sequences.iter().map(|ids| our_scores(m.as_ref(), ids)).collect();
    pipeline_model::adapter::load(&adapter, &candle_core::Device::Cpu).unwrap().attach(m.as_mut()).unwrap();
    let our_adapter: Vec<Scores> = sequences.iter().map(|ids| our_scores(m.as_ref(), ids)).collect();

    // Both compute in f32, in other orders: log-probabilities agree to about
    // 1e-4 (7.5e-5 measured on AVX-512 and AMX CPUs; the README states what
    // this run prints); an adapter ignored, or scaled other than α/r, moves
    // them by tenths.
    const TOLERANCE: f64 = 2.5e-4;
    let positions: usize = sequences.iter().map(|s| s.len()).sum();
    for (what, ours, theirs) in [
        ("transformers (base GGUF) vs our base", &our_base, &their_base),
        ("PEFT (base + our adapter) vs our base + adapter", &our_adapter, &their_peft),
        ("transformers (our merged directory) vs our base + adapter", &our_adapter, &their_merged),
    ] {
        let (worst, parted) = disagreement(ours, theirs, 2.0 * TOLERANCE);
        eprintln!(
            "{gguf}: {what}: largest log-probability difference {worst:.2e} over {positions} positions; likeliest \
             tokens part at {} non-tied positions ({})",
            parted.len(),
            report["versions"]
        );
        assert!(worst < TOLERANCE, "{what}: log-probabilities differ by {worst:.2e}");
        assert!(parted.is_empty(), "{what}: other likeliest tokens: {parted:?}");
    }
    let (moved, _) = disagreement(&our_base, &our_adapter, f64::INFINITY);
    assert!(moved > 0.1, "the adapter moves no log-probability by 0.1 ({moved:.2e}): the test would prove nothing");
}

/// A directory with `file` (a GGUF) and the base's tokenizer files, which
/// `pipeline generate` reads beside a GGUF.
fn gguf_with_tokenizer(models: &Path, dir: &Path, ty: QuantType) -> PathBuf {
    let src = models.join("gemma-3-270m");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let gguf = dir.join(format!("model-{}.gguf", ty.name()));
    write_gguf(&pipeline::model_source::from_path(&src).unwrap(), ty, "t", &gguf).unwrap();
    gguf
}

/// The first `n` greedy tokens of `pipeline`'s generator on `gguf` after `prompt`.
fn our_greedy(gguf: &Path, tok: &tokenizers::Tokenizer, prompt: &[u32], n: usize) -> Vec<u32> {
    let m = pipeline_model::load_for_inference(
        &pipeline::model_source::from_path(gguf).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let generator = pipeline_infer::generate::Generator::new(m.as_ref(), tok, &[]);
    let params = pipeline_infer::generate::GenerationParams { max_new_tokens: n, ..Default::default() };
    generator.generate(prompt, &params, 0, &mut |_| {}).unwrap().tokens
}

/// Logits closer than this are a tie between the two programs' roundings.
const TIE: f32 = 0.1;

/// How far below token `a`'s logit token `b`'s is, after `context`, with
/// `pipeline`'s model of `gguf`.
fn logit_gap(gguf: &Path, context: &[u32], a: u32, b: u32) -> f32 {
    let m = pipeline_model::load_for_inference(
        &pipeline::model_source::from_path(gguf).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let hidden = m.forward_cached(context, &mut m.new_cache()).unwrap();
    let last = hidden.narrow(0, context.len() - 1, 1).unwrap();
    let logits: Vec<f32> = m.logits(&last).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    logits[a as usize] - logits[b as usize]
}

fn conversations() -> Vec<Value> {
    let tools = "You are an assistant with tools. Answer with\n<tool_call>\n{\n  \"tool_name\": NAME,\n  \"args\": {...}\n}\n</tool_call>\n\nTools:\n  - get_weather(city)\n  - calculator(expression)";
    vec![
        json!([{"role": "system", "content": tools}, {"role": "user", "content": "What's the weather in Paris?"}]),
        json!([
            {"role": "system", "content": tools},
            {"role": "user", "content": "What is 12 * 7?"},
            {"role": "assistant", "content": "<tool_call>\n{\n  \"tool_name\": \"calculator\",\n  \"args\": {\"expression\": \"12 * 7\"}\n}\n</tool_call>"},
            {"role": "user", "content": "<tool_result>84</tool_result>"},
        ]),
        json!([{"role": "user", "content": "Write one sentence about the sea."}]),
    ]
}

#[test]
fn llama_server_renders_our_template_and_decodes_our_gguf_as_pipeline_generate_does() {
    let (Some(models), Some(bin)) = (models_dir(), common::llama_cpp("llama-server")) else { return };
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_with_tokenizer(&models, dir.path(), QuantType::Q8_0);
    let base = pipeline::model_source::from_path(&models.join("gemma-3-270m")).unwrap();
    let template = pipeline_infer::chat::ChatTemplate::for_model(&base, None, Path::new(".")).unwrap();
    let tok = tokenizers::Tokenizer::from_file(models.join("gemma-3-270m/tokenizer.json")).unwrap();
    let server = Server::start(&bin, &["-m", gguf.to_str().unwrap(), "--jinja"]);
    for (i, messages) in conversations().into_iter().enumerate() {
        // The server renders the GGUF's template as format-chat does.
        let rendered =
            server.post("/apply-template", &json!({"messages": messages}))["prompt"].as_str().unwrap().to_string();
        let msgs: Vec<pipeline_infer::chat::Message> = serde_json::from_value(messages.clone()).unwrap();
        let ours = template.render(&msgs, None, true).unwrap();
        // llama.cpp drops the template's leading `<bos>`: it adds the BOS
        // token itself when it tokenizes (`add_bos_token = true`).
        let ours_text = ours.strip_prefix("<bos>").expect("Gemma's template starts with <bos>");
        assert_eq!(rendered, ours_text, "conversation {i}: /apply-template differs from format-chat");
        // Its tokenizer gives our ids, and its detokenizer our text.
        let ids: Vec<u32> = tok.encode(ours.as_str(), false).unwrap().get_ids().to_vec();
        let theirs = server.post("/tokenize", &json!({"content": ours, "add_special": false, "parse_special": true}));
        assert_eq!(theirs["tokens"], json!(ids), "conversation {i}: /tokenize");
        let text = server.post("/detokenize", &json!({"tokens": ids}))["content"].as_str().unwrap().to_string();
        assert_eq!(text, ours, "conversation {i}: /detokenize does not round-trip");
        // Greedy decoding from the same ids: the same 24 tokens, up to the
        // first near-tie of the two programs' roundings.
        let body = json!({"prompt": ids, "n_predict": 24, "temperature": 0.0, "top_k": 1, "cache_prompt": false,
                          "return_tokens": true, "samplers": ["top_k"]});
        let served: Vec<u32> = serde_json::from_value(server.post("/completion", &body)["tokens"].clone()).unwrap();
        let ours_tokens = our_greedy(&gguf, &tok, &ids, 24);
        let same = served.iter().zip(&ours_tokens).take_while(|(a, b)| a == b).count();
        eprintln!(
            "llama-server conversation {i}: template, /tokenize, /detokenize equal; {same}/24 greedy tokens equal ({:?})",
            tok.decode(&ours_tokens, false).unwrap()
        );
        if same < 24 {
            // Both programs round (8-bit activations, llama.cpp's f16 KV
            // cache): where two tokens tie, either may win. Past a tie the
            // texts may differ; before it they must not, and the first
            // difference must be a tie.
            let context: Vec<u32> = ids.iter().chain(&ours_tokens[..same]).copied().collect();
            let gap = logit_gap(&gguf, &context, ours_tokens[same], served[same]);
            eprintln!("  first difference at token {same}: llama.cpp's choice is {gap:.3} below ours");
            assert!(
                gap < TIE,
                "conversation {i}: {same} greedy tokens agree, then llama.cpp's next token is {gap} below ours (not a tie):\n ours {ours_tokens:?}\n llama.cpp {served:?}"
            );
        }
    }
}

#[test]
fn llama_cpp_applies_our_adapter_gguf_as_our_merge_does() {
    let (Some(models), Some(bin)) = (models_dir(), common::llama_cpp("llama-server")) else { return };
    let p = Project::new();
    let base = pipeline::model_source::from_path(&models.join("gemma-3-270m")).unwrap();
    let adapter = p.path("adapter");
    random_adapter(&base, &adapter, 0.06);
    let merged = p.path("merged");
    let f32 = pipeline::stages::merge::WeightDtype::F32;
    pipeline::stages::merge::merge(&base, "", &adapter, None, f32, &merged).unwrap();
    let (base_gguf, merged_gguf, adapter_gguf) = (p.path("base.gguf"), p.path("merged.gguf"), p.path("adapter.gguf"));
    // f32 files: in f16 the merged weights round W + B·A while --lora adds
    // B·A to the rounded W, which parts greedy decoding on near-ties.
    write_gguf(&base, QuantType::F32, "base", &base_gguf).unwrap();
    write_gguf(&pipeline::model_source::from_path(&merged).unwrap(), QuantType::F32, "merged", &merged_gguf).unwrap();
    let arch = pipeline::stages::quantize::model_arch(&base).unwrap();
    pipeline::stages::quantize::write_adapter_gguf(&adapter, &arch, &adapter_gguf).unwrap();
    let tok = tokenizers::Tokenizer::from_file(models.join("gemma-3-270m/tokenizer.json")).unwrap();
    let template = pipeline_infer::chat::ChatTemplate::for_model(&base, None, Path::new(".")).unwrap();
    let prompts: Vec<Vec<u32>> = conversations()
        .into_iter()
        .map(|m| {
            let msgs: Vec<pipeline_infer::chat::Message> = serde_json::from_value(m).unwrap();
            tok.encode(template.render(&msgs, None, true).unwrap().as_str(), false).unwrap().get_ids().to_vec()
        })
        .collect();
    // Greedy tokens, and at each position the chosen token's log-probability
    // and its gap to the second likeliest (how near a tie the choice was).
    let greedy = |args: &[&str]| -> Vec<(Vec<u32>, Vec<(f64, f64)>)> {
        let server = Server::start(&bin, args);
        prompts
            .iter()
            .map(|ids| {
                let body = json!({"prompt": ids, "n_predict": 16, "temperature": 0.0, "top_k": 1, "n_probs": 2,
                                  "cache_prompt": false, "return_tokens": true, "samplers": ["top_k"]});
                let r = server.post("/completion", &body);
                let gaps = r["completion_probabilities"]
                    .as_array()
                    .expect("completion_probabilities")
                    .iter()
                    .map(|p| {
                        let top = &p["top_logprobs"];
                        let first = top[0]["logprob"].as_f64().unwrap();
                        (first, first - top[1]["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY))
                    })
                    .collect();
                (serde_json::from_value(r["tokens"].clone()).unwrap(), gaps)
            })
            .collect()
    };
    let with_lora = greedy(&["-m", base_gguf.to_str().unwrap(), "--lora", adapter_gguf.to_str().unwrap()]);
    let merged_out = greedy(&["-m", merged_gguf.to_str().unwrap()]);
    let base_out = greedy(&["-m", base_gguf.to_str().unwrap()]);
    // The two compute W·x + B·(A·x) and (W + B·A)·x: equal up to f32
    // rounding. Where they agree, their log-probabilities differ by at most
    // `noise`; greedy decoding may part only where the merged model's two
    // likeliest tokens are closer than twice that (plus 1e-4).
    for i in 0..prompts.len() {
        let ((lora, lora_p), (merged, merged_p)) = (&with_lora[i], &merged_out[i]);
        let same = lora.iter().zip(merged).take_while(|(a, b)| a == b).count();
        let noise = (0..same).map(|k| (lora_p[k].0 - merged_p[k].0).abs()).fold(0f64, f64::max);
        let gap = merged_p.get(same).map(|p| p.1);
        eprintln!(
            "--lora vs merged, prompt {i}: {same}/16 greedy tokens equal (log-prob noise {noise:.2e}{}); base alone \
             differs: {}",
            gap.filter(|_| same < 16).map(|g| format!(", then a top-2 gap of {g:.2e}")).unwrap_or_default(),
            base_out[i].0 != *merged
        );
        // (llama.cpp's KV cache is f16, so the two runs round differently;
        // an adapter not applied moves log-probabilities by whole units.)
        assert!(noise < 5e-2, "prompt {i}: --lora and the merged GGUF give other probabilities ({noise:.2e})");
        assert!(
            same >= 16 || gap.is_some_and(|g| g < 2.0 * noise + 1e-4),
            "prompt {i}: base + --lora adapter.gguf and the merged GGUF part after {same} tokens where the merged \
             model's choice was no near-tie (top-2 gap {gap:?}, noise {noise:.2e})"
        );
    }
    assert!(
        base_out.iter().zip(&merged_out).any(|(b, m)| b.0 != m.0),
        "the adapter changes no greedy token: the test would prove nothing"
    );
}

/// llama-server serves SmolLM2 trained in `chatml-tools` (its GGUF carries
/// that template): `/apply-template` renders every native tool-use
/// conversation of the validation split (tools, calls, results; up to its
/// final answer, as a server gets it) with the request's `tools` as
/// training rendered it, and the server takes `tools` and answers.
#[test]
fn llama_server_renders_chatml_tools_conversations_as_training_did() {
    let (Some(models), Some(bin)) = (models_dir(), common::llama_cpp("llama-server")) else { return };
    let dir = models.join("smollm2-135m-instruct");
    if !dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file() {
        return common::missing("SmolLM2-135M-Instruct is not provisioned", "run scripts/fetch-models.sh");
    }
    let p = Project::new();
    let base = pipeline::model_source::from_path(&dir).unwrap();
    let template = pipeline_infer::chat::ChatTemplate::for_model(&base, Some("chatml-tools"), Path::new(".")).unwrap();
    let gguf = p.path("smollm2.q8_0.gguf");
    let options = pipeline::stages::quantize::GgufOptions {
        chat_template: Some(template.source.clone()),
        keep_stored_blocks: false,
    };
    pipeline::stages::quantize::write_gguf_with(&base, QuantType::Q8_0, "t", &gguf, &options).unwrap();
    let server = Server::start(&bin, &["-m", gguf.to_str().unwrap(), "--jinja"]);
    served_as_trained(&server, &models, &template, "", "chatml-tools on SmolLM2");
}

/// Every native tool-use conversation of the validation split (up to its
/// final answer, as a server gets it: a final assistant turn is one
/// llama-server continues, unclosed), rendered by the server's
/// `/apply-template` with the request's `tools`, is `bos` + what
/// format-chat rendered for training; and the server takes `tools` and
/// answers.
fn served_as_trained(
    server: &Server,
    models: &Path,
    template: &pipeline_infer::chat::ChatTemplate,
    bos: &str,
    what: &str,
) {
    let openai = pipeline::server_eval::openai_message;
    let native = common::native_tool_conversations(models);
    let mut with_calls = 0;
    for (i, (messages, tools)) in native.iter().enumerate() {
        let mut msgs: Vec<pipeline_infer::chat::Message> = serde_json::from_value(messages.clone()).unwrap();
        if msgs.last().is_some_and(|m| m.role == "assistant") {
            msgs.pop();
        }
        with_calls += usize::from(msgs.iter().any(|m| m.tool_calls.is_some()));
        let body = json!({"messages": msgs.iter().map(openai).collect::<Vec<_>>(), "tools": tools});
        let rendered = server.post("/apply-template", &body)["prompt"].as_str().unwrap().to_string();
        let ours = template.render(&msgs, Some(tools), true).unwrap();
        assert_eq!(format!("{bos}{rendered}"), ours, "conversation {i}: /apply-template differs from format-chat");
    }
    assert!(with_calls >= 40, "{with_calls} conversations with calls");
    let (messages, tools) = &native[0];
    let first_user: Vec<Value> =
        messages.as_array().unwrap().iter().take_while(|m| m["role"] != "assistant").cloned().collect();
    let answer = server.post(
        "/v1/chat/completions",
        &json!({"messages": first_user, "tools": tools, "max_tokens": 16, "temperature": 0.0}),
    );
    assert!(answer["choices"][0]["message"].is_object(), "{answer}");
    eprintln!(
        "llama-server ({what}): /apply-template equals training's rendering on {} conversations \
         ({with_calls} with calls and results)",
        native.len()
    );
}

/// llama-server serves a Llama 3.2 model (the real Llama 3.2 tokenizer and
/// chat template on random weights; our GGUF carries the template) with
/// Llama 3.x's native tool format: `/apply-template` renders every native
/// tool-use conversation of the validation split with the request's
/// `tools` as format-chat rendered it for training (tools in the first user
/// turn, calls as JSON, `ipython` results), given training's fixed date
/// (`--chat-template-kwargs`), and the server takes `tools` and answers.
#[test]
fn llama_server_renders_llama3_tool_conversations_as_training_did() {
    let (Some(models), Some(bin)) = (models_dir(), common::llama_cpp("llama-server")) else { return };
    let p = Project::new();
    let dir = p.path("llama3");
    pipeline_model::testing::TinyLlama::new(128_256).write(&dir, &models.join("llama3.2-tokenizer"), 3).unwrap();
    let base = pipeline::model_source::from_path(&dir).unwrap();
    let template = pipeline_infer::chat::ChatTemplate::for_model(&base, None, Path::new(".")).unwrap();
    let gguf = p.path("llama3.q8_0.gguf");
    write_gguf(&base, QuantType::Q8_0, "t", &gguf).unwrap();
    let mut f = std::fs::File::open(&gguf).unwrap();
    let md = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap().metadata;
    assert!(md["tokenizer.ggml.add_bos_token"].to_bool().unwrap(), "Llama 3 adds <|begin_of_text|>");
    let kwargs = json!({"date_string": pipeline_infer::chat::DATE_STRING}).to_string();
    let server = Server::start(&bin, &["-m", gguf.to_str().unwrap(), "--jinja", "--chat-template-kwargs", &kwargs]);
    // llama-server leaves the template's BOS text out: it adds the BOS token
    // itself (`tokenizer.ggml.add_bos_token`).
    served_as_trained(&server, &models, &template, "<|begin_of_text|>", "Llama 3.2's own template");
}
