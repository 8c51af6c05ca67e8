//! The evaluation runner: a split's rows, already rendered and tokenized,
//! scored (eval loss) and answered (decoded, then judged) by one model.
//!
//! Rows run in token order, so that neighbours share their system prompt
//! and tool list: each row copies the previous row's KV cache up to what
//! they share instead of recomputing it. Rows are scored one by one and
//! decoded `batch` at a time (batched decoding). The `evaluate` stage builds
//! the rows and writes the reports; `generate` and library users can run
//! the same loop on their own rows.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::catalogue::Catalogue;
use crate::chat::ChatTemplate;
use crate::constrain::CallGrammar;
use crate::eval::{Gold, Metric, Tally, Task, rouge_l, score_tool_call};
use crate::generate::{Generation, GenerationParams, Generator};
use crate::toolbox::Toolbox;
use crate::{Result, toolcall};
use pipeline_model::{CausalLm, KvCache};

/// One row to evaluate.
#[derive(Debug, Clone)]
pub struct EvalRow {
    /// Its id in `predictions.jsonl`.
    pub id: String,
    /// Tokens of the prompt (the conversation up to the first assistant
    /// turn, with the generation prompt).
    pub prompt: Vec<u32>,
    /// Tokens of the whole conversation and its loss mask.
    pub full: Vec<u32>,
    pub mask: Vec<u8>,
    /// The answer the model's is judged against.
    pub gold: Gold,
    /// The group the per-group tables count it in, if any.
    pub group: Option<String>,
    /// The grammar of this row's own tools (as a server builds it from a
    /// request's `tools`), when calls are constrained.
    pub grammar: Option<CallGrammar>,
}

/// How rows are run and judged.
pub struct Runner<'a> {
    pub model: &'a dyn CausalLm,
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// The template the rows were rendered with (its end of turn stops decoding).
    pub template: &'a ChatTemplate,
    pub rows: &'a [EvalRow],
    pub task: Task,
    pub generation: &'a GenerationParams,
    pub seed: u64,
    /// Rows decoded together.
    pub batch: usize,
    /// Whether each row's eval loss is computed (its whole conversation then
    /// runs through the model, else only its prompt).
    pub loss: bool,
    /// Rows with a longer prompt are skipped (recorded, not decoded).
    pub max_prompt: usize,
    /// The grammar decoding follows for rows without their own, if any.
    pub grammar: Option<&'a CallGrammar>,
    /// The tools a call must pass the schema of.
    pub catalogue: &'a Catalogue,
    /// The implementations calls are executed on, if any.
    pub toolbox: Option<&'a Toolbox>,
}

/// What running every row with one model gave.
#[derive(Debug, Clone)]
pub struct ModelRun {
    pub overall: BTreeMap<String, Metric>,
    pub groups: BTreeMap<String, BTreeMap<String, Metric>>,
    /// One record per row (`predictions.jsonl`), in the rows' order.
    pub predictions: Vec<Value>,
    /// Rows whose prompt was too long to decode.
    pub skipped: usize,
    pub seconds: f64,
}

/// A row after its loss pass: its cache (holding `held`), tally and loss.
struct Scored {
    row: usize,
    cache: KvCache,
    held: Vec<u32>,
    tally: Tally,
    loss: Option<f64>,
    loss_s: f64,
}

impl Runner<'_> {
    /// Every row with the model as it is now, its records labelled `model`;
    /// `on_row` is called as each row is scored (progress).
    pub fn run(&self, model: &str, on_row: &dyn Fn()) -> Result<ModelRun> {
        let t0 = std::time::Instant::now();
        let generator = self.generator();
        let mut records: Vec<(usize, Tally, Value)> = Vec::with_capacity(self.rows.len());
        let mut last: Option<Scored> = None;
        for group in self.order().chunks(self.batch.max(1)) {
            let mut scored: Vec<Scored> = Vec::with_capacity(group.len());
            for &i in group {
                let prev = scored.last().or(last.as_ref());
                scored.push(self.score(i, prev)?);
                on_row();
            }
            let decode: Vec<usize> =
                (0..scored.len()).filter(|&k| self.rows[scored[k].row].prompt.len() <= self.max_prompt).collect();
            let grammars: Vec<Option<&CallGrammar>> = scored
                .iter()
                .enumerate()
                .filter(|(k, _)| decode.contains(k))
                .map(|(_, s)| self.rows[s.row].grammar.as_ref().or(self.grammar))
                .collect();
            let mut jobs: Vec<(&[u32], &mut KvCache)> = scored
                .iter_mut()
                .enumerate()
                .filter(|(k, _)| decode.contains(k))
                .map(|(_, s)| (self.rows[s.row].prompt.as_slice(), &mut s.cache))
                .collect();
            let mut generations =
                generator.generate_batch_constrained(&mut jobs, &grammars, self.generation, self.seed)?.into_iter();
            for (k, s) in scored.iter_mut().enumerate() {
                let row = &self.rows[s.row];
                let g = if decode.contains(&k) { generations.next() } else { None };
                records.push(self.record(model, s, g.as_ref()));
                // The cache now holds the prompt and what was fed back of the answer.
                let text: Vec<u32> = row.prompt.iter().chain(g.iter().flat_map(|g| &g.tokens)).copied().collect();
                s.held = text[..s.cache.len().min(text.len())].to_vec();
            }
            last = scored.pop();
        }
        records.sort_by_key(|(i, _, _)| *i);
        let (mut overall, mut groups) = (Tally::default(), BTreeMap::<String, Tally>::new());
        let mut skipped = 0;
        let mut predictions = Vec::with_capacity(records.len());
        for (i, tally, record) in records {
            skipped += usize::from(record.get("skipped").is_some());
            overall.merge(&tally);
            if let Some(g) = &self.rows[i].group {
                groups.entry(g.clone()).or_default().merge(&tally);
            }
            predictions.push(record);
        }
        Ok(ModelRun {
            overall: overall.metrics(),
            groups: groups.into_iter().map(|(k, t)| (k, t.metrics())).collect(),
            predictions,
            skipped,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// Decoding with the model as it is now, stopping at the template's end
    /// of turn, under the runner's grammar if any.
    pub fn generator(&self) -> Generator<'_> {
        Generator::for_template(self.model, self.tokenizer, self.template).constrained(self.grammar)
    }

    /// Row indices sorted by the tokens each row runs through the model.
    fn order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_by(|&a, &b| self.scored_tokens(&self.rows[a]).cmp(self.scored_tokens(&self.rows[b])));
        order
    }

    /// Whether row's loss is computed (then the whole conversation runs
    /// through the model, else only its prompt).
    fn scores_loss(&self, row: &EvalRow) -> bool {
        self.loss && row.full.len() <= self.model.max_positions() && row.mask.contains(&1)
    }

    fn scored_tokens<'r>(&self, row: &'r EvalRow) -> &'r [u32] {
        if self.scores_loss(row) { &row.full } else { &row.prompt }
    }

    /// Row `i`'s loss over its assistant tokens, from a cache that starts
    /// with what `prev`'s cache shares with it; the cache is left holding
    /// the row's prompt (or a prefix of it) for decoding.
    fn score(&self, i: usize, prev: Option<&Scored>) -> Result<Scored> {
        let t = std::time::Instant::now();
        let row = &self.rows[i];
        let tokens = self.scored_tokens(row);
        let mut reuse = prev.map_or(0, |p| common_prefix(&p.held, tokens));
        let scoring = self.scores_loss(row);
        if scoring {
            // The loss needs hidden states from the position before the first
            // scored token on.
            let first = row.mask.iter().position(|&m| m == 1).expect("a scored token");
            reuse = reuse.min(first.saturating_sub(1));
        }
        let mut cache = match prev {
            Some(p) if reuse > 0 => p.cache.prefix_copy(reuse)?,
            _ => self.model.new_cache(),
        };
        let mut tally = Tally::default();
        let mut loss = None;
        if scoring {
            let hidden = self.model.prefill(&row.full, &mut cache)?;
            let s = row.full.len() - hidden.dim(0)?;
            let (l, n) = self.model.masked_loss(&hidden, &row.full[s..], &row.mask[s..])?;
            let l = l.to_scalar::<f32>()? as f64;
            tally.loss(l * n as f64, n);
            loss = Some(l);
            cache.truncate(common_prefix(&row.prompt, &row.full));
        }
        let held = tokens[..cache.len()].to_vec();
        Ok(Scored { row: i, cache, held, tally, loss, loss_s: t.elapsed().as_secs_f64() })
    }

    /// The prediction record of a scored row, with its generation (none when
    /// its prompt is too long), and the row's tally.
    fn record(&self, model: &str, s: &mut Scored, g: Option<&Generation>) -> (usize, Tally, Value) {
        let row = &self.rows[s.row];
        let mut tally = std::mem::take(&mut s.tally);
        let Some(g) = g else {
            let record = json!({
                "id": row.id, "model": model, "group": row.group,
                "prompt_tokens": row.prompt.len(), "skipped": "prompt longer than max_prompt_tokens",
                "loss": s.loss,
            });
            return (s.row, tally, record);
        };
        let pred = toolcall::parse(&g.text);
        let mut record = json!({
            "id": row.id, "model": model, "group": row.group,
            "prompt_tokens": row.prompt.len(), "generated": g.text, "finish": g.finish,
            "parsed": pred, "gold": row.gold.calls, "loss": s.loss,
            "seconds": {"loss": s.loss_s, "prefill": g.prefill_s, "decode": g.decode_s},
            "new_tokens": g.tokens.len(),
        });
        match self.task {
            Task::Qa => {
                let f1 = rouge_l(&g.text, &row.gold.text);
                tally.rouge(f1);
                record["rouge_l"] = json!(f1);
            }
            _ => {
                let v = score_tool_call(&pred, &g.text, &row.gold, self.catalogue, self.toolbox);
                tally.tool(&v);
                record["verdict"] = serde_json::to_value(&v).expect("a verdict serializes");
            }
        }
        (s.row, tally, record)
    }
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
