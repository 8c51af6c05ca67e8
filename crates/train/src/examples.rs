//! Tokenized examples as the `tokenize` stage stores them and training
//! reads them: one safetensors file per split, ragged: `input_ids` (u32, all
//! examples concatenated), `loss_mask` (u8, same length: 1 where the token is
//! trained on) and `offsets` (i64, n+1 boundaries); the example ids are in
//! the file's metadata.

use std::collections::HashMap;
use std::path::Path;

use pipeline_fs::IoContext;

use crate::error::{Result, bad_file};
use safetensors::tensor::{Dtype, TensorView};

/// The tokenized examples of one split, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedSplit {
    pub ids: Vec<String>,
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    /// Example `i` is `input_ids[offsets[i]..offsets[i + 1]]`.
    pub offsets: Vec<i64>,
}

impl TokenizedSplit {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Examples from (id, token ids, loss mask) triples; the mask marks with
    /// 1 the tokens trained on (predicted from the ones before).
    pub fn from_examples(examples: impl IntoIterator<Item = (String, Vec<u32>, Vec<u8>)>) -> TokenizedSplit {
        let mut split = TokenizedSplit { ids: vec![], input_ids: vec![], loss_mask: vec![], offsets: vec![0] };
        for (id, ids, mask) in examples {
            assert_eq!(ids.len(), mask.len(), "example `{id}`: one mask value per token");
            split.ids.push(id);
            split.input_ids.extend(ids);
            split.loss_mask.extend(mask);
            split.offsets.push(split.input_ids.len() as i64);
        }
        split
    }

    /// Tokens in the longest example (0 when there are none).
    pub fn longest(&self) -> usize {
        self.offsets.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
    }

    /// Keeps the first `n` examples.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.ids.truncate(n);
            self.offsets.truncate(n + 1);
            let end = self.offsets[n] as usize;
            self.input_ids.truncate(end);
            self.loss_mask.truncate(end);
        }
    }

    /// Token ids and mask of example `i`.
    pub fn example(&self, i: usize) -> (&[u32], &[u8]) {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        (&self.input_ids[a..b], &self.loss_mask[a..b])
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let ids: Vec<u8> = self.input_ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let offs: Vec<u8> = self.offsets.iter().flat_map(|x| x.to_le_bytes()).collect();
        let n = self.input_ids.len();
        let tensors = [
            ("input_ids", TensorView::new(Dtype::U32, vec![n], &ids).expect("sizes match")),
            ("loss_mask", TensorView::new(Dtype::U8, vec![n], &self.loss_mask).expect("sizes match")),
            ("offsets", TensorView::new(Dtype::I64, vec![self.offsets.len()], &offs).expect("sizes match")),
        ];
        let meta = HashMap::from([("ids".to_string(), serde_json::to_string(&self.ids).expect("serializes"))]);
        safetensors::serialize_to_file(tensors, Some(meta), path)
            .map_err(|e| bad_file(path, format!("cannot write: {e}")))
    }

    pub fn load(path: &Path) -> Result<TokenizedSplit> {
        let bytes = std::fs::read(path).on("read", path)?;
        let not_examples = |e: safetensors::SafeTensorError| bad_file(path, format!("not a tokenized split: {e}"));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(not_examples)?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(not_examples)?;
        let ids =
            meta.metadata().as_ref().and_then(|m| m.get("ids")).ok_or_else(|| bad_file(path, "no `ids` metadata"))?;
        let ids: Vec<String> =
            serde_json::from_str(ids).map_err(|e| bad_file(path, format!("bad `ids` metadata: {e}")))?;
        let get = |name: &str| st.tensor(name).map_err(|_| bad_file(path, format!("no tensor `{name}`")));
        let input_ids =
            get("input_ids")?.data().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        let loss_mask = get("loss_mask")?.data().to_vec();
        let offsets =
            get("offsets")?.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        Ok(TokenizedSplit { ids, input_ids, loss_mask, offsets })
    }
}
