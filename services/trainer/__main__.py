from services.trainer.server import main

main()
