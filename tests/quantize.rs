//! The `quantize` stage: GGUF files of the real Gemma 3 270M that a reader
//! nobody here wrote (the `gguf` Python package) and candle's reader accept,
//! with llama-quantize's per-tensor types, a Q8_0 file whose perplexity is
//! within 1 % of the f32 reference, and block encodings that match the
//! reference formulas byte for byte.

mod common;

use std::collections::BTreeMap;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use common::Project;

fn tensor_types(path: &std::path::Path) -> (gguf_file::Content, BTreeMap<String, GgmlDType>) {
    let mut f = std::fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let types = c.tensor_infos.iter().map(|(n, i)| (n.clone(), i.ggml_dtype)).collect();
    (c, types)
}

#[test]
fn real_270m_gguf_files_are_complete_and_accurate() {
    let Some(models) = common::models_dir() else { return };
    let real = models.join("gemma-3-270m/gemma-3-270m-q4_k_m.gguf");
    let p = Project::new();
    p.write(
        "recipe.toml",
        &format!(
            "[recipe]\nname = \"q\"\n[model]\nbase = \"{}\"\n[stages.gguf]\nkind = \"quantize\"\ntypes = [\"q8_0\", \
             \"q4_k_m\"]\n",
            models.join("gemma-3-270m").display()
        ),
    );
    p.ok(&["run", "recipe.toml"]);
    let out = p.run(&["show", "recipe.toml", "gguf"]);
    let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let q8 = dir.join("model-q8_0.gguf");
    let q4 = dir.join("model-q4_k_m.gguf");

    // Per-tensor types of our Q4_K_M equal those of the published Q4_K_M file.
    let (_, want) = tensor_types(&real);
    let (content, got) = tensor_types(&q4);
    assert_eq!(got.len(), 236);
    assert_eq!(got, want, "per-tensor quantization types differ from llama-quantize's");

    // The metadata llama.cpp needs (../shared/reference/gguf-gemma3.md).
    let md = &content.metadata;
    let u = |k: &str| md.get(k).unwrap_or_else(|| panic!("missing {k}")).to_u32().unwrap();
    assert_eq!(md["general.architecture"].to_string().unwrap(), "gemma3");
    for (k, v) in [
        ("gemma3.context_length", 32768),
        ("gemma3.embedding_length", 640),
        ("gemma3.block_count", 18),
        ("gemma3.feed_forward_length", 2048),
        ("gemma3.attention.head_count", 4),
        ("gemma3.attention.head_count_kv", 1),
        ("gemma3.attention.key_length", 256),
        ("gemma3.attention.value_length", 256),
        ("gemma3.attention.sliding_window", 512),
        ("tokenizer.ggml.bos_token_id", 2),
        // The provisioned tokenizer_config (Gemma 3 -it) names <end_of_turn> as EOS.
        ("tokenizer.ggml.eos_token_id", 106),
        ("tokenizer.ggml.eot_token_id", 106),
        ("tokenizer.ggml.unknown_token_id", 3),
        ("tokenizer.ggml.padding_token_id", 0),
        ("general.file_type", 15),
    ] {
        assert_eq!(u(k), v, "{k}");
    }
    assert_eq!(md["gemma3.rope.freq_base"].to_f32().unwrap(), 1_000_000.0);
    assert_eq!(md["gemma3.attention.layer_norm_rms_epsilon"].to_f32().unwrap(), 1e-6);
    assert!(!md["tokenizer.ggml.add_space_prefix"].to_bool().unwrap());
    assert!(md["tokenizer.ggml.add_bos_token"].to_bool().unwrap());
    assert_eq!(md["tokenizer.ggml.model"].to_string().unwrap(), "llama");
    // Tokens and token types agree with the published file.
    let mut f = std::fs::File::open(&real).unwrap();
    let reference = gguf_file::Content::read(&mut f).unwrap();
    let arr = |c: &gguf_file::Content, k: &str| c.metadata[k].to_vec().unwrap().clone();
    let (ours, theirs) = (arr(&content, "tokenizer.ggml.tokens"), arr(&reference, "tokenizer.ggml.tokens"));
    assert_eq!(ours.len(), 262_144);
    // Every token text, the whitespace runs (user-defined, pre-normalized
    // to spaces) included.
    let differ: Vec<usize> =
        (0..ours.len()).filter(|&i| ours[i].to_string().unwrap() != theirs[i].to_string().unwrap()).collect();
    assert!(
        differ.is_empty(),
        "{} token texts differ from the published file, e.g. ids {:?}",
        differ.len(),
        &differ[..differ.len().min(8)]
    );
    let (ours, theirs) = (arr(&content, "tokenizer.ggml.token_type"), arr(&reference, "tokenizer.ggml.token_type"));
    let differ: Vec<usize> =
        (0..ours.len()).filter(|&i| ours[i].to_i32().unwrap() != theirs[i].to_i32().unwrap()).collect();
    eprintln!("token types differing from the published file: {differ:?}");
    // The provisioned (-it) tokenizer marks <start_of_image> and
    // <end_of_image> special, so the converter's rule makes them CONTROL;
    // the published base file has them USER_DEFINED.
    assert_eq!(differ, [255_999, 256_000], "token types");

    // A reader nobody here wrote: the `gguf` Python package.
    let script = "import gguf,sys\nr=gguf.GGUFReader(sys.argv[1])\nassert len(r.tensors)==236, len(r.tensors)\n\
         names={t.name for t in r.tensors}\nfor n in ['token_embd.weight','output_norm.weight','blk.17.post_ffw_norm.weight',\
         'blk.5.ffn_norm.weight','blk.0.post_attention_norm.weight','blk.0.attn_q_norm.weight']:\n    assert n in names, n\n\
         assert 'output.weight' not in names\nprint(r.fields['general.architecture'].contents(), len(r.fields))";
    if let Some(out) = common::python_check("gguf", script, &[q4.to_str().unwrap()]) {
        eprintln!("gguf (Python): {out}");
    }

    // Our own inference on the Q8_0 file: perplexity within 1 % of 16.835.
    let tok = tokenizers::Tokenizer::from_file(models.join("gemma-3-270m/tokenizer.json")).unwrap();
    let mut resolved = pipeline::model_source::from_path(&models.join("gemma-3-270m")).unwrap();
    resolved.weights = vec![q8.clone()];
    let m = pipeline_model::load_for_inference(&resolved, &Device::Cpu).unwrap();
    let (ppl, _) = common::llama_cpp_perplexity(m.as_ref(), &tok);
    eprintln!("Q8_0 perplexity {ppl:.3} (f32 reference 16.835, llama.cpp Q8_0 16.892)");
    assert!((ppl / 16.835 - 1.0).abs() < 0.01, "Q8_0 perplexity {ppl} is not within 1 % of 16.835");
}

#[test]
fn block_encodings_match_the_reference_formulas() {
    let x: Vec<f32> = (0..64).map(|i| ((i as f32 * 0.37).sin() * 3.0) + if i == 5 { -7.5 } else { 0.0 }).collect();
    let t = Tensor::from_vec(x.clone(), (2, 32), &Device::Cpu).unwrap();
    let bytes = |dtype| QTensor::quantize(&t, dtype).unwrap().data().unwrap().to_vec();
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();

    // Q8_0: d = max|x|/127, q = round(x/d); block = f16 d, 32 × i8.
    let mut want = Vec::new();
    for b in x.chunks(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        want.extend_from_slice(&f16(d));
        want.extend(b.iter().map(|v| ((v / d).round() as i8) as u8));
    }
    assert_eq!(bytes(GgmlDType::Q8_0), want, "q8_0");

    // Q4_0: d = max/-8 (signed value of largest magnitude), q = min(15, trunc(x/d + 8.5));
    // low nibbles hold elements 0..16, high nibbles 16..32.
    let mut want = Vec::new();
    for b in x.chunks(32) {
        let max = b.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        want.extend_from_slice(&f16(d));
        let q = |v: f32| ((v * id + 8.5) as u8).min(15);
        want.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
    }
    assert_eq!(bytes(GgmlDType::Q4_0), want, "q4_0");

    // F16: IEEE half, little-endian.
    let want: Vec<u8> = x.iter().flat_map(|&v| f16(v)).collect();
    assert_eq!(bytes(GgmlDType::F16), want, "f16");
}

#[test]
fn qwen_gguf_round_trips_through_our_reader() {
    use pipeline::stages::quantize::{QuantType, write_gguf};
    use pipeline_model::qwen::Variant;
    use pipeline_model::testing::TinyQwen;
    let Some(models) = common::models_dir() else { return };
    let ids: Vec<u32> = (0..17).map(|i| (i * 7717 + 5) % 151_000).collect();
    for variant in [Variant::Qwen3, Variant::Qwen2] {
        let dir = tempfile::tempdir().unwrap();
        TinyQwen::new(variant, 151_936).write(dir.path(), &models.join("qwen3-tokenizer"), 4).unwrap();
        let resolved = pipeline::model_source::from_path(dir.path()).unwrap();
        let reference = pipeline_model::load(&resolved, &Device::Cpu, 64).unwrap().hidden(&ids, None).unwrap();
        for (t, tol) in [(QuantType::F32, 1e-5), (QuantType::F16, 2e-2)] {
            let path = dir.path().join(format!("model-{}.gguf", t.name()));
            write_gguf(&resolved, t, "tiny", &path).unwrap();
            let (content, _) = tensor_types(&path);
            assert_eq!(content.metadata["tokenizer.ggml.model"].to_string().unwrap(), "gpt2");
            assert!(!content.metadata["tokenizer.ggml.merges"].to_vec().unwrap().is_empty());
            let mut back = resolved.clone();
            back.weights = vec![path];
            back.config_json = None;
            let h = pipeline_model::load(&back, &Device::Cpu, 64).unwrap().hidden(&ids, None).unwrap();
            let diff = (h - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < tol, "{variant:?} {}: hidden states differ by {diff}", t.name());
        }

        // A model without its tokenizer: a clear error, naming the fix.
        std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
        let resolved = pipeline::model_source::from_path(dir.path()).unwrap();
        let err = write_gguf(&resolved, QuantType::Q8_0, "tiny", &dir.path().join("x.gguf")).unwrap_err().to_string();
        assert!(err.contains("no tokenizer.json") && err.contains("[model] tokenizer"), "{err}");
    }
}

#[test]
fn lora_adapter_as_gguf_has_llama_cpp_names_and_shapes() {
    let Some(models) = common::models_dir() else { return };
    let p = Project::new();
    common::tiny_gemma3(&models, &p.path("model"), 4096);
    p.write("data/train.jsonl", &common::chat_jsonl(8));
    let recipe = common::train_recipe(&p.path("model"), "max_steps = 1\nrank = 4\nalpha = 8\n")
        + "\n[stages.merged]\nkind = \"merge\"\nadapter = \"train\"\nchat = \"chat\"\n\
           \n[stages.gguf]\nkind = \"quantize\"\nmodel = \"merged\"\ntypes = [\"f16\"]\nlora_adapter = \"train\"\n";
    p.write("recipe.toml", &recipe);
    p.ok(&["run", "recipe.toml"]);
    let out = p.run(&["show", "recipe.toml", "gguf"]);
    let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let (content, types) = tensor_types(&dir.join("adapter.gguf"));
    let md = &content.metadata;
    assert_eq!(md["general.type"].to_string().unwrap(), "adapter");
    assert_eq!(md["adapter.type"].to_string().unwrap(), "lora");
    assert_eq!(md["general.architecture"].to_string().unwrap(), "gemma3");
    assert_eq!(md["adapter.lora.alpha"].to_f32().unwrap(), 8.0);
    assert_eq!(types.len(), 2 * 7 * 2, "A and B for 7 modules in 2 layers");
    let a = &content.tensor_infos["blk.1.attn_q.weight.lora_a"];
    let b = &content.tensor_infos["blk.1.attn_q.weight.lora_b"];
    // candle lists dims outermost first: A [r, in], B [out, r] as in PEFT.
    assert_eq!(a.shape.dims(), [4, 64]);
    assert_eq!(b.shape.dims(), [64, 4]);
    assert!(types.values().all(|t| *t == GgmlDType::F32));
    let (base, _) = tensor_types(&dir.join("model-f16.gguf"));
    assert!(base.tensor_infos.contains_key("blk.1.attn_q.weight"));
}

/// The base written to be served beside an adapter (`base_types`): the real
/// Q4_K_M Gemma 3 270M keeps every block as stored (our per-tensor types are
/// llama-quantize's, which wrote it), so llama.cpp serves the weights the
/// adapter was trained on, and the file carries the trained chat template.
#[test]
fn a_quantized_base_keeps_its_blocks_and_carries_the_trained_template() {
    use pipeline::stages::quantize::{GgufOptions, QuantType, write_gguf_with};
    let Some(models) = common::models_dir() else { return };
    let base = pipeline::model_source::from_path(&models.join("gemma-3-270m")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("base-q4_k_m.gguf");
    let options = GgufOptions { chat_template: Some("{{ 'trained' }}".into()), keep_stored_blocks: true };
    let stats = write_gguf_with(&base, QuantType::Q4KM, "t", &out, &options).unwrap();
    let (theirs, their_types) = tensor_types(&base.weights[0]);
    let (ours, our_types) = tensor_types(&out);
    assert_eq!(our_types, their_types, "llama-quantize's per-tensor types");
    assert_eq!(stats["tensors_kept_as_stored"], stats["tensors"], "{stats}");
    let (mut a, mut b) = (std::fs::File::open(&base.weights[0]).unwrap(), std::fs::File::open(&out).unwrap());
    for name in our_types.keys() {
        let x = theirs.tensor(&mut a, name, &Device::Cpu).unwrap();
        let y = ours.tensor(&mut b, name, &Device::Cpu).unwrap();
        assert!(x.data().unwrap() == y.data().unwrap(), "{name}: blocks differ from the base's");
    }
    assert_eq!(ours.metadata["tokenizer.chat_template"].to_string().unwrap(), "{{ 'trained' }}");

    // Without the option, the same file is decoded and encoded again: the
    // blocks llama-quantize would write from those weights.
    let again = dir.path().join("again.gguf");
    let stats = pipeline::stages::quantize::write_gguf(&base, QuantType::Q4KM, "t", &again).unwrap();
    assert_eq!(stats["tensors_kept_as_stored"], 0, "{stats}");
}
