"""`hashret demo`: the whole job end to end on the Grocery data, one level above the stages.

train/, export/ and serve/ stand side by side over hashret/ and never import one another; this
package sits on top and chains them, each through its own public entry point, exactly as a user
would from the shell. Modules: `cli` (the command's flags and its list of steps), `steps` (what
each step does), `data` (finding, downloading and subsetting the dataset), `ledger` (progress lines
and the reuse record), `queries` (asking the running service and scoring its answers), `report`
(summary.json, queries.jsonl, the printout) and `contact_sheet` (demo.html).
"""
