//! The quickstart recipe end to end, every stage, on the real Gemma 3 270M,
//! offline, shortened with `--set` so that CI runs it in minutes: data →
//! chat → tokens → train → eval (base beside adapter) → merge → GGUF → Modelfile;
//! then its GGUF served by llama-server, asked with `tools` as agents ask.

mod common;

use common::Project;

#[test]
fn quickstart_runs_every_stage_offline() {
    let Some(models) = common::models_dir() else { return };
    let recipe = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/quickstart.toml"))
        .unwrap()
        .replace("../models/gemma-3-270m", &models.join("gemma-3-270m").display().to_string());
    let p = Project::new();
    p.write("quickstart.toml", &recipe);
    // Long enough for the model to learn the native call format (the served
    // check below needs calls to compare), short enough for CI: 24 steps on
    // the traces' first answers at a high learning rate.
    let set = [
        "stages.chat.train_on=first-assistant",
        "stages.train.max_steps=24",
        "stages.train.learning_rate=1e-3",
        "stages.train.warmup_steps=2",
        "stages.train.eval_examples=2",
        "stages.train.eval_every=12",
        "stages.eval.limit=2",
        "stages.eval.generation.max_new_tokens=8",
    ];
    let mut args = vec!["run", "quickstart.toml"];
    for s in &set {
        args.extend(["--set", s]);
    }
    p.ok(&args);
    let show = |stage: &str| {
        let mut a = vec!["show", "quickstart.toml", stage];
        for s in &set {
            a.extend(["--set", s]);
        }
        let out = p.run(&a);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    };
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(show("eval").join("report.json")).unwrap()).unwrap();
    assert!(report["models"]["base"]["overall"]["loss"]["value"].is_number());
    assert!(report["models"]["adapter"]["overall"]["loss"]["value"].is_number());
    assert!(show("merged").join("model.safetensors").is_file());
    for f in ["model-q8_0.gguf", "model-q4_k_m.gguf", "adapter.gguf", "base-q4_k_m.gguf"] {
        assert!(show("gguf").join(f).is_file(), "{f}");
    }
    let ollama = show("ollama");
    let modelfile = std::fs::read_to_string(ollama.join("Modelfile")).unwrap();
    assert!(modelfile.contains("FROM ./model.gguf") && modelfile.contains("PARAMETER stop \"<end_of_turn>\""));
    assert_eq!(
        std::fs::metadata(ollama.join("model.gguf")).unwrap().len(),
        std::fs::metadata(show("gguf").join("base-q4_k_m.gguf")).unwrap().len()
    );

    // `export` writes model cards that huggingface_hub reads as the hub does.
    let mut a = vec!["export", "quickstart.toml", "--to", "out"];
    for s in &set {
        a.extend(["--set", s]);
    }
    p.ok(&a);
    let script = r#"
import sys
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
for sub, library in [("train", "peft"), ("merged", "transformers")]:
    path = sys.argv[1] + "/" + sub + "/README.md"
    card = ModelCard.load(path)
    d = card.data
    assert d.base_model == "google/gemma-3-270m", d.base_model
    assert d.library_name == library, d.library_name
    assert d.license == "gemma", d.license
    assert d.pipeline_tag == "text-generation"
    assert d.datasets == ["shawhin/tool-use-finetuning"], d.datasets
    assert "tool-calling" in d.tags, d.tags
    results = d.eval_results
    assert results, "model-index results"
    names = {r.metric_type: r.metric_value for r in results}
    assert "decision_accuracy" in names and "loss" in names, names
    assert all(r.dataset_type == "shawhin/tool-use-finetuning" and r.dataset_split == "validation" for r in results)
    assert metadata_load(path)["model-index"][0]["name"] == "quickstart"
    print(sub, len(results), names["decision_accuracy"])
"#;
    let out = common::python_check("huggingface_hub", script, &[p.path("out").to_str().unwrap()]);
    if let Some(out) = out {
        assert!(out.contains("train ") && out.contains("merged "), "{out}");
    }
    // The training log as HF Trainer and TensorBoard users read it.
    let script = r#"
import sys, csv
from transformers import TrainerState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
d = sys.argv[1] + "/train"
rows = list(csv.DictReader(open(d + "/loss.csv")))
state = TrainerState.load_from_json(d + "/trainer_state.json")
steps = [h for h in state.log_history if "loss" in h]
assert [h["step"] for h in steps] == [int(r["step"]) for r in rows], steps
assert all(abs(h["loss"] - float(r["loss"])) < 1e-5 for h, r in zip(steps, rows))
assert all("learning_rate" in h and "grad_norm" in h and "epoch" in h for h in steps)
assert state.global_step == int(rows[-1]["step"]) == state.max_steps
evals = [h for h in state.log_history if "eval_loss" in h]
assert [h["step"] for h in evals] == [0] + [int(r["step"]) for r in rows if r["eval_loss"]], evals
ea = EventAccumulator(d + "/runs")
ea.Reload()
tags = set(ea.Tags()["scalars"])
assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/epoch", "eval/loss"} <= tags, tags
loss = ea.Scalars("train/loss")
assert [e.step for e in loss] == [int(r["step"]) for r in rows]
assert all(abs(e.value - float(r["loss"])) < 1e-4 for e, r in zip(loss, rows))
assert [e.step for e in ea.Scalars("eval/loss")] == [h["step"] for h in evals]
print("logs", len(loss), len(evals))
"#;
    let out = common::python_check("tensorboard", script, &[p.path("out").to_str().unwrap()]);
    if let Some(out) = out {
        assert_eq!(out, "logs 24 3");
    }
    let card = std::fs::read_to_string(p.path("out/train/README.md")).unwrap();
    assert!(card.contains("PeftModel.from_pretrained") && card.contains("| metric | base | fine-tuned |"), "{card}");

    // The fine-tune, served by llama-server as agents call it.
    // The Modelfile serves the base's own Q4_K_M blocks with the adapter on
    // top (merging and quantizing to 4 bits again would round the
    // fine-tune away).
    let ollama = show("ollama");
    let modelfile = std::fs::read_to_string(ollama.join("Modelfile")).unwrap();
    assert!(modelfile.contains("FROM ./model.gguf\nADAPTER ./adapter.gguf\n"), "{modelfile}");
    assert!(ollama.join("model.gguf").is_file() && ollama.join("adapter.gguf").is_file());

    // The fine-tune, served by llama-server as agents call it: the base with
    // the adapter, as the Modelfile serves it, and merged into one file.
    let gguf = show("gguf");
    let on_base = Served {
        gguf: gguf.join("base-q4_k_m.gguf"),
        adapter: Some((gguf.join("adapter.gguf"), show("train"))),
        what: "the Q4_K_M base with adapter.gguf (--lora)",
    };
    served_tool_calls_are_the_ones_we_parse(&show("chat"), &on_base);
    let merged = Served { gguf: gguf.join("model-q8_0.gguf"), adapter: None, what: "the merged Q8_0 file" };
    served_tool_calls_are_the_ones_we_parse(&show("chat"), &merged);
}

/// A GGUF served by llama-server, with a LoRA adapter on it or not.
struct Served {
    gguf: std::path::PathBuf,
    /// The adapter as GGUF (for the server) and as PEFT (for us).
    adapter: Option<(std::path::PathBuf, std::path::PathBuf)>,
    what: &'static str,
}

/// llama-server (`--jinja`) on one of the quickstart's GGUF files, sent validation
/// rows as an agent sends them (`/v1/chat/completions` with the row's
/// `tools`, no system prompt). Where the two programs' greedy decoding
/// agrees (llama.cpp's `/completion` from the same prompt ids), the server
/// returns the `tool_calls` (names and JSON arguments) that `pipeline
/// generate` parses from our answer (the whole list where the answer ends
/// its turn; the first call where a briefly trained model repeats calls up
/// to the token limit) and plain `content` where we call nothing, unless its
/// call grammar refused our call; rows where greedy decoding parts are
/// counted, not compared. A second turn carrying the tool's result is
/// rendered as training rendered it, and answered. The tools are sent with
/// open parameters (see below).
fn served_tool_calls_are_the_ones_we_parse(chat: &std::path::Path, served: &Served) {
    use pipeline_infer::chat::Message;
    use serde_json::{Value, json};
    let Some(bin) = common::llama_cpp("llama-server") else { return };
    let template = pipeline::stages::format_chat::trained_template(chat).unwrap();
    let tok =
        tokenizers::Tokenizer::from_file(common::models_dir().unwrap().join("gemma-3-270m/tokenizer.json")).unwrap();
    let mut model = pipeline_model::load_for_inference(
        &pipeline::model_source::from_path(&served.gguf).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut server_args = vec!["-m", served.gguf.to_str().unwrap(), "--jinja"];
    if let Some((gguf, peft)) = &served.adapter {
        let adapter = pipeline_model::adapter::LoadedAdapter::read(peft, &candle_core::Device::Cpu).unwrap();
        adapter.attach(model.as_mut()).unwrap();
        server_args.extend(["--lora", gguf.to_str().unwrap()]);
    }
    let stops = pipeline_infer::generate::stop_tokens(&template.end_of_turn, &template.eos_token);
    let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
    let generator = pipeline_infer::generate::Generator::new(model.as_ref(), &tok, &stops);
    const NEW: usize = 64;
    // Where the programs' greedy answers part, the lead of our token over
    // theirs in our logits (reported: the two round differently, 8-bit
    // activations and llama.cpp's f16 KV cache, and a model trained for a
    // minute has many near-ties).
    let mut widest_gap = 0f32;
    let (mut agreed, mut parted) = (0, 0);
    let params = pipeline_infer::generate::GenerationParams { max_new_tokens: NEW, ..Default::default() };
    let server = common::Server::start(&bin, &server_args);
    let rows: Vec<Value> = std::fs::read_to_string(chat.join("conversations/validation.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Messages as the OpenAI API takes them (what `pipeline eval-server` sends).
    let openai = pipeline::server_eval::openai_message;
    // Calls as (name, arguments object), whichever shape they come in.
    let calls = |v: Option<&Value>| -> Vec<(String, Value)> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|c| {
                        let args = &c["function"]["arguments"];
                        let args =
                            args.as_str().map_or(args.clone(), |s| serde_json::from_str(s).unwrap_or(Value::Null));
                        (c["function"]["name"].as_str().unwrap().to_string(), args)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (mut same_calls, mut same_content, mut grammar, mut second_turns) = (0, 0, 0, 0);
    let mut whole_lists = 0;
    // The first 14 rows keep each check to a couple of minutes.
    const ROWS: usize = 14;
    for row in rows.iter().take(ROWS) {
        let messages: Vec<Message> = serde_json::from_value(row["messages"].clone()).unwrap();
        // The row's tools with open parameters (any JSON object): a model
        // trained for a minute writes arguments the real schemas refuse, and
        // the server's grammar would rewrite them; with open parameters its
        // grammar only keeps calls to listed tools, as JSON, and both programs
        // decode the same prompt freely. (The recipe's own model is checked
        // against the real schemas with `pipeline eval-server`.)
        let open_tools: Option<Value> = row.get("tools").filter(|t| !t.is_null()).map(|t| {
            t.as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    json!({"type": "function", "function": {"name": t["function"]["name"],
                    "description": t["function"]["description"], "parameters": {"type": "object"}}})
                })
                .collect()
        });
        let tools = open_tools.as_ref();
        let first = messages.iter().position(|m| m.role == "assistant").unwrap();
        let prompt_text = template.render(&messages[..first], tools, true).unwrap();
        let prompt = pipeline_infer::generate::encode(&tok, &prompt_text).unwrap();
        let ours = generator.generate(&prompt, &params, 0, &mut |_| {}).unwrap();
        // What we parse from our answer: its complete `<tool_call>` blocks (a
        // block cut by the token limit is no call, for either program) and
        // the text before them.
        let tagged = ours.text.contains("<tool_call>");
        let parsed = pipeline_infer::toolcall::parse(&ours.text);
        let our_calls: Vec<(String, Value)> =
            parsed.calls.iter().filter(|_| tagged).map(|c| (c.name.clone(), c.arguments.clone())).collect();
        let our_content = ours.text[..ours.text.find("<tool_call>").unwrap_or(ours.text.len())].trim();
        let mut ours_msg = Message::new("assistant", our_content);
        if !our_calls.is_empty() {
            let list: Vec<Value> = our_calls
                .iter()
                .enumerate()
                .map(|(i, (name, args))| {
                    json!({"id": format!("call_{i}"), "type": "function",
                    "function": {"name": name, "arguments": args}})
                })
                .collect();
            ours_msg.tool_calls = Some(Value::Array(list));
        }
        let mut request = json!({"messages": messages[..first].iter().map(openai).collect::<Vec<_>>(),
            "temperature": 0.0, "max_tokens": NEW});
        if let Some(t) = tools {
            request["tools"] = t.clone();
        }
        // Greedy decoding in both programs from the same prompt ids
        // (llama.cpp's without the grammar): where they part, at a near-tie
        // of their roundings, the answers are not compared (counted).
        let body = json!({"prompt": prompt, "n_predict": NEW, "temperature": 0.0, "top_k": 1, "cache_prompt": false,
                          "return_tokens": true, "samplers": ["top_k"]});
        let raw: Vec<u32> = serde_json::from_value(server.post("/completion", &body)["tokens"].clone()).unwrap();
        let k = raw.iter().zip(&ours.tokens).take_while(|(a, b)| a == b).count();
        if k < raw.len().max(ours.tokens.len()) {
            if k < raw.len().min(ours.tokens.len()) {
                let context: Vec<u32> = prompt.iter().chain(&ours.tokens[..k]).copied().collect();
                let hidden = model.forward_cached(&context, &mut model.new_cache()).unwrap();
                let last = hidden.narrow(0, context.len() - 1, 1).unwrap();
                let logits: Vec<f32> = model.logits(&last).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                widest_gap = widest_gap.max(logits[ours.tokens[k] as usize] - logits[raw[k] as usize]);
            }
            parted += 1;
            continue;
        }
        agreed += 1;
        let served = server.post("/v1/chat/completions", &request);
        let theirs = &served["choices"][0]["message"];
        let their_calls = calls(theirs.get("tool_calls"));
        let their_content = theirs["content"].as_str().unwrap_or_default().trim().to_string();
        if our_calls == their_calls && our_calls.is_empty() && their_content == our_content {
            same_content += 1;
            continue;
        }
        // A model trained for minutes may repeat its call until the token
        // limit instead of ending its turn, and the server's grammar then
        // shapes the later blocks: the first call is compared, and the whole
        // list where our answer ended its turn.
        let ended = ours.finish == pipeline_infer::generate::Finish::Stop;
        let calls_agree = if ended { our_calls == their_calls } else { our_calls.first() == their_calls.first() };
        if !our_calls.is_empty() && calls_agree && their_content == our_content {
            same_calls += 1;
            whole_lists += usize::from(ended);
            // The conversation goes on with the tool's result, rendered by the
            // server as training rendered it, and answered.
            let mut next = messages[..first].to_vec();
            next.push(ours_msg.clone());
            let mut result = Message::new("tool", "{'status': 'ok'}");
            result.tool_call_id = ours_msg.tool_calls.as_ref().unwrap()[0]["id"].as_str().map(str::to_string);
            next.push(result);
            let mut body = json!({"messages": next.iter().map(openai).collect::<Vec<_>>()});
            if let Some(t) = tools {
                body["tools"] = t.clone();
            }
            let rendered = server.post("/apply-template", &body)["prompt"].as_str().unwrap().to_string();
            let want = template.render(&next, tools, true).unwrap();
            assert_eq!(Some(rendered.as_str()), want.strip_prefix("<bos>"), "second turn of {}", row["id"]);
            body["max_tokens"] = 16.into();
            body["temperature"] = 0.0.into();
            let answer = server.post("/v1/chat/completions", &body);
            assert!(answer["choices"][0]["message"].is_object(), "{answer}");
            second_turns += 1;
            continue;
        }
        // The answers part. A first call that is not JSON, or names a tool the
        // request does not list, is one the server's grammar (built from the
        // request's tools) never lets through: that explains it.
        let mut catalogue = pipeline_infer::catalogue::Catalogue::default();
        if let Some(t) = tools {
            catalogue.add_list(t);
        }
        let first_call_outside = match parsed.calls.first() {
            Some(c) if tagged => !catalogue.tools.contains_key(&c.name),
            _ => tagged && !parsed.invalid.is_empty(),
        };
        // Our answer ran out of tokens inside the opening tag (`…<tool_call`):
        // the server's grammar, triggered by the tag, writes the call itself.
        let tail = &ours.text[ours.text.rfind('<').unwrap_or(ours.text.len())..];
        let cut_in_tag = ours.finish != pipeline_infer::generate::Finish::Stop
            && !tail.is_empty()
            && "<tool_call>".starts_with(tail.trim_end());
        if first_call_outside || cut_in_tag {
            grammar += 1;
            continue;
        }
        panic!("{}: the same greedy text, other answers: ours {ours_msg:?}, served {theirs}", row["id"]);
    }
    eprintln!(
        "llama-server with tools on {}, {ROWS} validation rows: greedy decoding agrees on {agreed}: \
         {same_calls} answered with the tool_calls we parse ({whole_lists} whole lists, the others their first call, \
         the model repeating calls until the limit; {second_turns} second turns rendered as trained and answered), \
         {same_content} with our content and no call, {grammar} where the server's call grammar overrode a call to \
         an unlisted tool or a call that is not JSON; {parted} parted (our token's widest lead {widest_gap:.3})",
        served.what
    );
    assert!(
        agreed >= 3 && same_calls >= 1,
        "too few rows compare ({agreed}, {same_calls} with calls): the check would prove little"
    );
}
