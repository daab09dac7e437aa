from wbdit import ops, reference
