//! fetch-dataset, format-chat and tokenize on every supported input: local
//! jsonl/json/csv/parquet, row filters with seeded sampling, validation
//! carving, the three row shapes, and the loss mask on real tokenizers.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{Project, local_recipe, models_dir, shared_dir};
use pipeline::stages::format_chat::Conversation;
use pipeline::stages::tokenize::TokenizedSplit;

fn fetch_recipe(source: &str, extra: &str) -> String {
    format!(
        "[recipe]\nname = \"t\"\nseed = 7\n[model]\nbase = \"unused\"\n[stages.data]\nkind = \"fetch-dataset\"\nsource = \"{source}\"\n{extra}\n"
    )
}

/// Rows of split `split` of the only fetch-dataset entry.
fn rows(p: &Project, key_dir: &Path, split: &str) -> Vec<serde_json::Value> {
    let _ = p;
    std::fs::read_to_string(key_dir.join(format!("rows/{split}.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn show(p: &Project, recipe: &str, stage: &str) -> std::path::PathBuf {
    let out = p.run(&["show", recipe, stage]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().into()
}

#[test]
fn local_jsonl_json_and_csv_give_the_same_rows() {
    let p = Project::new();
    p.write("d/a.jsonl", "{\"question\": \"q1\", \"answer\": \"a1\"}\n\n{\"question\": \"q2\", \"answer\": \"a2\"}\n");
    p.write("d/b.json", r#"[{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]"#);
    p.write("d/c.csv", "question,answer\nq1,a1\n\"q2\",\"a2\"\n");
    let mut all = Vec::new();
    for f in ["d/a.jsonl", "d/b.json", "d/c.csv"] {
        let name = format!("{}.toml", f.replace('/', "_"));
        p.write(&name, &fetch_recipe(f, ""));
        p.ok(&["run", &name]);
        all.push(rows(&p, &show(&p, &name, "data"), "train"));
    }
    assert_eq!(all[0], all[1]);
    assert_eq!(all[0], all[2]);
    assert_eq!(all[0].len(), 2);
}

#[test]
fn local_parquet_glob_and_explicit_split_files() {
    let p = Project::new();
    let data = shared_dir()
        .join("hf/hub/datasets--shawhin--tool-use-finetuning/snapshots/0000000000000000000000000000000000000001/data");
    let glob = format!("{}/*.parquet", data.display());
    p.write("g.toml", &fetch_recipe(&glob, "columns = [\"query\", \"query_type\"]"));
    p.ok(&["run", "g.toml"]);
    let dir = show(&p, "g.toml", "data");
    let train = rows(&p, &dir, "train");
    assert_eq!(train.len(), 477);
    assert_eq!(train[0].as_object().unwrap().keys().collect::<Vec<_>>(), vec!["query", "query_type"]);
    assert_eq!(rows(&p, &dir, "validation").len(), 60);

    let explicit = format!(
        "[recipe]\nname = \"e\"\n[model]\nbase = \"x\"\n[stages.data]\nkind = \"fetch-dataset\"\n\
         files = {{ dev = \"{}/validation-00000-of-00001.parquet\" }}\nrename = {{ q = \"query\" }}\nlimit = 5\n",
        data.display()
    );
    p.write("e.toml", &explicit);
    p.ok(&["run", "e.toml"]);
    let dev = rows(&p, &show(&p, "e.toml", "data"), "dev");
    assert_eq!(dev.len(), 5);
    assert!(dev[0].get("q").is_some() && dev[0].get("query").is_none());
}

#[test]
fn keep_rules_sample_a_seeded_fraction_and_validation_is_carved() {
    let p = Project::new();
    let mut text = String::new();
    for i in 0..100 {
        let kind = if i % 4 == 0 {
            "no_tool"
        } else if i % 4 == 1 {
            "hard"
        } else {
            "easy"
        };
        text += &format!("{{\"i\": {i}, \"query_type\": \"{kind}\", \"tool_needed\": {}}}\n", kind != "no_tool");
    }
    p.write("d.jsonl", &text);
    let rules = "validation_fraction = 0.1\n\
                 [[stages.data.keep]]\nwhere = { query_type = \"easy\", tool_needed = true }\n\
                 [[stages.data.keep]]\nwhere = { query_type = \"no_tool\" }\nfraction = 0.2\n";
    p.write("r.toml", &fetch_recipe("d.jsonl", rules));
    p.ok(&["run", "r.toml"]);
    let dir = show(&p, "r.toml", "data");
    let (train, val) = (rows(&p, &dir, "train"), rows(&p, &dir, "validation"));
    let all: Vec<_> = train.iter().chain(&val).collect();
    let count = |k: &str| all.iter().filter(|r| r["query_type"] == k).count();
    assert_eq!(count("easy"), 50);
    assert_eq!(count("no_tool"), 5, "20 % of 25");
    assert_eq!(count("hard"), 0);
    assert_eq!(val.len(), 6, "10 % of 55, rounded");
    let ids = |rs: &[serde_json::Value]| rs.iter().map(|r| r["i"].as_i64().unwrap()).collect::<BTreeSet<_>>();
    assert!(ids(&train).is_disjoint(&ids(&val)));

    // Same seed: same rows. Another seed: another sample.
    let again = Project::new();
    again.write("d.jsonl", &text);
    again.write("r.toml", &fetch_recipe("d.jsonl", rules));
    again.ok(&["run", "r.toml"]);
    assert_eq!(rows(&again, &show(&again, "r.toml", "data"), "train"), train);
    again.ok(&["run", "r.toml", "--set", "recipe.seed=8"]);
    let other = again.run(&["show", "r.toml", "data", "--set", "recipe.seed=8"]);
    let other_dir = String::from_utf8_lossy(&other.stdout).trim().to_string();
    assert_ne!(rows(&again, Path::new(&other_dir), "train"), train);
}

#[test]
fn a_contains_condition_with_fraction_zero_drops_rows() {
    // The tool-use dataset's `no_tool` rows whose trace calls a tool anyway.
    let p = Project::new();
    let mut text = String::new();
    for i in 0..12 {
        let (kind, answer) = match i % 3 {
            0 => ("no_tool", "<final_answer>hi</final_answer>"),
            1 => ("no_tool", "<tool_call>{}</tool_call>"),
            _ => ("easy", "<tool_call>{}</tool_call>"),
        };
        // The instructions show the call format: only the answer counts.
        let instructions = "Call tools as <tool_call>{...}</tool_call>.";
        let trace =
            serde_json::json!([{"role": "user", "content": instructions}, {"role": "assistant", "content": answer}]);
        text += &format!("{{\"i\": {i}, \"query_type\": \"{kind}\", \"trace\": {trace}}}\n");
    }
    p.write("train.jsonl", &text);
    p.write("validation.jsonl", &text);
    // Rules for `train` only: the evaluated split stays whole.
    let rules = "[[stages.data.keep]]\nwhere = { query_type = \"no_tool\", trace = { contains = \"<tool_call>\", role = \"assistant\" } }\n\
                 fraction = 0\nsplits = [\"train\"]\n[[stages.data.keep]]\nsplits = [\"train\"]\n";
    p.write("r.toml", &fetch_recipe("*.jsonl", rules));
    p.ok(&["run", "r.toml"]);
    let dir = show(&p, "r.toml", "data");
    let ids = |split| rows(&p, &dir, split).iter().map(|r| r["i"].as_i64().unwrap()).collect::<Vec<_>>();
    assert_eq!(ids("train"), [0, 2, 3, 5, 6, 8, 9, 11]);
    assert_eq!(ids("validation"), (0..12).collect::<Vec<_>>());
}

#[test]
fn row_shapes_instruction_qa_and_sharegpt_render_with_spans() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    p.write("alpaca.jsonl", "{\"instruction\": \"Name a fish\", \"input\": \"\", \"output\": \"Goldfish\"}\n");
    p.write("qa.jsonl", "{\"question\": \"白点病怎么治？\", \"answer\": \"提高水温并用药。\"}\n");
    p.write(
        "sharegpt.jsonl",
        "{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}, {\"from\": \"gpt\", \"value\": \"hello\"}]}\n",
    );
    for (file, answer) in [("alpaca.jsonl", "Goldfish"), ("qa.jsonl", "提高水温并用药。"), ("sharegpt.jsonl", "hello")]
    {
        let name = format!("{file}.toml");
        p.write(&name, &local_recipe(&models, file, ""));
        p.ok(&["run", &name]);
        let conv: Conversation = serde_json::from_str(
            std::fs::read_to_string(show(&p, &name, "chat").join("conversations/train.jsonl")).unwrap().trim(),
        )
        .unwrap();
        assert_eq!(conv.spans.len(), 1);
        let s = conv.spans[0];
        // Qwen3's template gives the final turn an empty think block.
        assert_eq!(&conv.text[s.start..s.end], format!("<think>\n\n</think>\n\n{answer}<|im_end|>"), "{file}");
    }

    // The built-in alpaca template gives the LLaMA-Factory prompt.
    let alpaca = local_recipe(&models, "qa.jsonl", "").replace("[model]\n", "[model]\nchat_template = \"alpaca\"\n");
    p.write("alp.toml", &alpaca);
    p.ok(&["run", "alp.toml"]);
    let conv: Conversation = serde_json::from_str(
        std::fs::read_to_string(show(&p, "alp.toml", "chat").join("conversations/train.jsonl")).unwrap().trim(),
    )
    .unwrap();
    assert_eq!(
        conv.text,
        "### Instruction:\n白点病怎么治？\n\n### Input:\n\n### Response:\n提高水温并用药。<|im_end|>\n\n"
    );
}

/// Decodes each contiguous run of masked tokens independently of the stage.
fn masked_text(tok: &tokenizers::Tokenizer, ids: &[u32], mask: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        if mask[i] == 1 {
            let j = (i..ids.len()).find(|&j| mask[j] == 0).unwrap_or(ids.len());
            out += &tok.decode(&ids[i..j], false).unwrap();
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn the_loss_mask_is_exactly_the_assistant_turns_on_the_real_gemma_tokenizer() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    let recipe = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/quickstart.toml"))
        .unwrap()
        .replace("../models", models.to_str().unwrap())
        .replace("max_len = 1024", "max_len = 8192");
    p.write("q.toml", &recipe);
    p.ok(&["run", "q.toml", "--until", "tokens"]);
    let tok = tokenizers::Tokenizer::from_file(models.join("gemma-3-270m/tokenizer.json")).unwrap();
    let convs: Vec<Conversation> =
        std::fs::read_to_string(show(&p, "q.toml", "chat").join("conversations/validation.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let split = TokenizedSplit::load(&show(&p, "q.toml", "tokens").join("tokens/validation.safetensors")).unwrap();
    assert_eq!(split.len(), convs.len());
    for (i, conv) in convs.iter().enumerate() {
        let (ids, mask) = split.example(i);
        // Each assistant turn as rendered (its text, its native calls) and its
        // end-of-turn marker, nothing else.
        let want: String = conv.spans.iter().map(|sp| &conv.text[sp.start..sp.end]).collect();
        assert_eq!(masked_text(&tok, ids, mask), want, "example {}", conv.id);
        assert_eq!(conv.spans.len(), conv.messages.iter().filter(|m| m.role == "assistant").count());
        for (sp, m) in conv.spans.iter().zip(conv.messages.iter().filter(|m| m.role == "assistant")) {
            let turn = &conv.text[sp.start..sp.end];
            assert!(turn.starts_with(m.content.trim()) && turn.ends_with("<end_of_turn>"), "{}: {turn}", conv.id);
            for c in m.tool_calls.iter().flat_map(|t| t.as_array().unwrap()) {
                let name = c["function"]["name"].as_str().unwrap();
                assert!(turn.contains(&format!("<tool_call>\n{{\"name\":\"{name}\"")), "{}: {turn}", conv.id);
            }
        }
        assert_eq!(ids[0], 2, "starts with <bos>");
        assert_eq!(tok.decode(ids, false).unwrap(), conv.text, "ids decode to the rendered text");
    }
}

#[test]
fn direct_answers_are_supervised_on_their_first_tokens_and_calls_whole() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    let recipe = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/quickstart.toml"))
        .unwrap()
        .replace("../models", models.to_str().unwrap())
        .replace("max_len = 1024", "max_len = 8192\ndirect_answer_tokens = 8");
    assert!(recipe.contains("direct_answer_tokens = 8"), "the quickstart's tokenize stage moved");
    p.write("q.toml", &recipe);
    p.ok(&["run", "q.toml", "--until", "tokens"]);
    let tok = tokenizers::Tokenizer::from_file(models.join("gemma-3-270m/tokenizer.json")).unwrap();
    let convs: Vec<Conversation> =
        std::fs::read_to_string(show(&p, "q.toml", "chat").join("conversations/validation.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let split = TokenizedSplit::load(&show(&p, "q.toml", "tokens").join("tokens/validation.safetensors")).unwrap();
    assert_eq!(split.len(), convs.len());
    let (mut calls, mut direct) = (0, 0);
    for (i, conv) in convs.iter().enumerate() {
        let (ids, mask) = split.example(i);
        // Worked out here from the whole example: every token of a turn that
        // calls a tool, the first 8 of one that answers directly, and nothing
        // after the last of them.
        let full = tok.encode(conv.text.as_str(), false).unwrap();
        let mut want = vec![0u8; full.len()];
        for sp in &conv.spans {
            let is_call = conv.messages[sp.message].tool_calls.is_some();
            if is_call {
                calls += 1
            } else {
                direct += 1
            }
            let inside = full.get_offsets().iter().enumerate().filter(|(_, (s, _))| *s >= sp.start && *s < sp.end);
            for (n, (t, _)) in inside.enumerate() {
                want[t] = u8::from(is_call || n < 8);
            }
        }
        let end = want.iter().rposition(|&m| m == 1).unwrap() + 1;
        assert_eq!(ids, &full.get_ids()[..end], "{}: the example up to its last supervised token", conv.id);
        assert_eq!(mask, &want[..end], "{}: calls whole, direct answers' first 8 tokens", conv.id);
    }
    assert!(calls > 0 && direct > 0, "{calls} calls, {direct} direct answers: both kinds are checked");
}

#[test]
fn rewrites_clean_the_named_role_in_the_named_splits_only() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    let row = |a: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": "```xml <final_answer>?"},
            {"role": "assistant", "content": a}]})
        .to_string()
    };
    let answers = ["```xml <final_answer> Fins.", "`<final_answer>` Gills.", "<final_answer> Scales."];
    p.write("train.jsonl", &answers.map(row).join("\n"));
    p.write("validation.jsonl", &row(answers[0]));
    let recipe = local_recipe(&models, "unused", "")
        .replace("source = \"unused\"", "files = { train = \"train.jsonl\", validation = \"validation.jsonl\" }")
        .replace(
            "dataset = \"data\"\n",
            "dataset = \"data\"\n[[stages.chat.rewrite]]\npattern = '^\\s*(?:```xml\\s*)?`?<final_answer>`?'\n\
             replace = \"<final_answer>\"\nsplits = [\"train\"]\n",
        );
    p.write("r.toml", &recipe);
    p.ok(&["run", "r.toml", "--until", "chat"]);
    let chat = show(&p, "r.toml", "chat");
    let read = |split: &str| -> Vec<Conversation> {
        let text = std::fs::read_to_string(chat.join(format!("conversations/{split}.jsonl"))).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let contents = |c: &Conversation, role: &str| c.messages.iter().find(|m| m.role == role).unwrap().content.clone();
    let train = read("train");
    let got: Vec<String> = train.iter().map(|c| contents(c, "assistant")).collect();
    assert_eq!(got, ["<final_answer> Fins.", "<final_answer> Gills.", "<final_answer> Scales."]);
    // The user's message and the validation split are left as the dataset has them.
    assert_eq!(contents(&train[0], "user"), "```xml <final_answer>?");
    assert_eq!(contents(&read("validation")[0], "assistant"), answers[0]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(chat.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["metrics"]["splits"]["train"]["rewritten_messages"], 2);

    // A pattern that does not compile is refused before anything runs, naming the rule.
    p.write("bad.toml", &recipe.replace("(?:```xml", "(?:```xml("));
    let out = p.run(&["validate", "bad.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("rewrite 1") && err.contains("stages.chat"), "{err}");
}
